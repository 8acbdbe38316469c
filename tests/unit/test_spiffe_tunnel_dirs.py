"""The tunnel's private socket directories do not pile up in /tmp."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from igw.client import _spiffe


def test_stale_directories_of_dead_processes_are_swept_and_live_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    old = time.time() - 600
    made = {}
    for label, name in {"dead": f"igw-tls-{dead_pid}-abc", "live": f"igw-tls-{os.getpid()}-abc",
                        "legacy": "igw-tls-abcdef", "fresh-dead": f"igw-tls-{dead_pid}-new"}.items():
        d = tmp_path / name
        d.mkdir()
        (d / "tunnel.sock").touch()
        if label != "fresh-dead":
            os.utime(d, (old, old))
        made[label] = d
    _spiffe._SWEPT.clear()
    _spiffe._sweep_stale_dirs()
    assert not made["dead"].exists()
    assert made["live"].exists() and made["legacy"].exists() and made["fresh-dead"].exists()


async def test_a_closed_tunnel_removes_its_directory_and_an_unclosed_one_goes_at_exit(tmp_path: Path) -> None:
    files = _spiffe.TlsFiles(tmp_path / "c", tmp_path / "k", tmp_path / "ca")
    t = _spiffe.SpiffeTunnel("127.0.0.1:1", "spiffe://x/y", files)
    d = Path(t.path).parent
    assert d.name.startswith(f"igw-tls-{os.getpid()}-") and oct(d.stat().st_mode & 0o777) == "0o700"
    await t.start()
    await t.close()
    assert not d.exists()
    script = ("from pathlib import Path; from igw.client._spiffe import SpiffeTunnel, TlsFiles; "
              "t = SpiffeTunnel('127.0.0.1:1', 'spiffe://x/y', TlsFiles(Path('a'), Path('b'), Path('c'))); "
              "print(t.path)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert not Path(out.strip()).parent.exists()
