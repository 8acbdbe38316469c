"""The Containerfile's promises that can be read without building it (`make image-test` builds and runs it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "Containerfile").read_text()


def test_base_is_a_build_argument_defaulting_to_slim_python() -> None:
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", TEXT, re.M)
    froms = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", TEXT, re.M)
    assert froms == [("${BASE_IMAGE}", "build"), ("${BASE_IMAGE}", "")]  # two stages, one base


def test_final_stage_is_non_root_with_an_init_and_labels() -> None:
    final = TEXT.split("\nFROM ${BASE_IMAGE}\n", 1)[1]
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert 'ENTRYPOINT ["/opt/igw/bin/dumb-init", "--"]' in final
    for label in ("org.opencontainers.image.version", "org.opencontainers.image.revision"):
        assert label in final
    # Nothing is installed in the final stage: it copies the venv built in the first.
    assert "RUN " not in final and "COPY --from=build /opt/igw /opt/igw" in final
    # The runtime dependencies only: the wheel is installed without the dev extra.
    assert "./clients . dumb-init" in TEXT and "[dev]" not in TEXT
    # Nor the dev package or the benchmark: neither is copied, nor even in the build context.
    assert not re.search(r"^COPY (dev|bench)/", TEXT, re.M) and "./dev" not in TEXT
    allowed = {line for line in (ROOT / ".containerignore").read_text().splitlines() if line.startswith("!")}
    assert allowed == {"!pyproject.toml", "!README.md", "!clients/", "!migrations/", "!services/"}


def test_build_context_ignore_files_agree_and_hadolint_passes() -> None:
    assert (ROOT / ".containerignore").read_text() == (ROOT / ".dockerignore").read_text()
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run([str(hadolint), str(ROOT / "Containerfile")], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
