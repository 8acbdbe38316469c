"""Where the routing config's digest pin comes from: the environment, or a file shipped with it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.router.config import ConfigSource
from services.router.routing import ConfigError

CONFIG = """version: 1
providers:
  p: {type: openai, base_url: "http://127.0.0.1:9/v1", local: true}
deployments:
  d: {provider: p, model: m, price: fake-small}
models:
  fast: {candidates: [d]}
"""


def _write(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = tmp_path / "router.yaml"
    path.write_text(text)
    return path, hashlib.sha256(text.encode()).hexdigest()


def test_the_pin_file_wins_over_the_environment_and_takes_sha256sum_output(tmp_path: Path) -> None:
    path, digest = _write(tmp_path, CONFIG)
    pin = tmp_path / "router.yaml.sha256"
    pin.write_text(f"{digest.upper()}  router.yaml\n")
    source = ConfigSource(path, pinned_env="0" * 64, pin_file=pin)
    cfg = source.load()
    assert cfg.sha256 == digest and source.current_pin == digest


def test_a_pin_that_does_not_match_or_is_not_a_digest_is_refused(tmp_path: Path) -> None:
    path, _digest = _write(tmp_path, CONFIG)
    pin = tmp_path / "pin"
    source = ConfigSource(path, pin_file=pin)
    with pytest.raises(ConfigError, match="cannot read the digest pin file"):
        source.load()
    pin.write_text("not-a-digest\n")
    with pytest.raises(ConfigError, match="holds no SHA-256"):
        source.load()
    pin.write_text("a" * 64)
    with pytest.raises(ConfigError, match="does not match"):
        source.load()
    assert source.current_pin == ""  # nothing was accepted


def test_stamps_change_when_either_file_changes(tmp_path: Path) -> None:
    path, digest = _write(tmp_path, CONFIG)
    pin = tmp_path / "pin"
    pin.write_text(digest)
    source = ConfigSource(path, pin_file=pin)
    before = source.stamps()
    pin.write_text(digest + "  router.yaml\n")
    assert source.stamps() != before
    middle = source.stamps()
    path.write_text(CONFIG + "# changed\n")
    assert source.stamps() != middle
    assert ConfigSource(path, pinned_env=digest).stamps()[1] is None
