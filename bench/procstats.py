"""CPU seconds and RSS of the processes under test (psutil), sampled around each run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil


def proc_group(pid: int, with_children: bool) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    procs = [p]
    if with_children:
        try:
            procs += p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return procs


class ProcSet:
    """Named groups of processes; ``snapshot()`` gives CPU seconds (user+system) and RSS per group.

    A group is one pid, optionally with all its children (Postgres: the postmaster and its
    backends; LiteLLM: the master and its workers). Children are looked up at every
    snapshot, so backends that come and go are counted while they live.
    """

    def __init__(self) -> None:
        self.groups: dict[str, tuple[int, bool]] = {}

    def add(self, name: str, pid: int | None, *, children: bool = False) -> None:
        if pid:
            self.groups[name] = (int(pid), children)

    def remove(self, name: str) -> None:
        self.groups.pop(name, None)

    def snapshot(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, (pid, children) in self.groups.items():
            cpu = 0.0
            rss = 0
            n = 0
            for p in proc_group(pid, children):
                try:
                    with p.oneshot():
                        t = p.cpu_times()
                        cpu += t.user + t.system
                        rss += p.memory_info().rss
                        n += 1
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            out[name] = {"cpu_s": round(cpu, 4), "rss_mb": round(rss / 2**20, 2), "procs": n}
        return out


def delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], calls: int,
          wall_s: float) -> dict[str, dict[str, float]]:
    """Per group: CPU seconds used, CPU ms per call, CPU % of one core, RSS (after)."""
    out: dict[str, dict[str, float]] = {}
    for name, a in after.items():
        b = before.get(name, {"cpu_s": a["cpu_s"]})
        cpu = max(a["cpu_s"] - b["cpu_s"], 0.0)
        out[name] = {
            "cpu_s": round(cpu, 4),
            "cpu_ms_per_call": round(cpu * 1000 / calls, 4) if calls else None,  # type: ignore[dict-item]
            "cpu_pct": round(100 * cpu / wall_s, 1) if wall_s > 0 else None,  # type: ignore[dict-item]
            "rss_mb": a["rss_mb"],
        }
    return out


def postmaster_pid(pg_data_dir: Path) -> int | None:
    """The postmaster's pid from ``<dir>/pgdata/postmaster.pid`` (or ``<dir>/postmaster.pid``)."""
    for cand in (pg_data_dir / "pgdata" / "postmaster.pid", pg_data_dir / "postmaster.pid"):
        if cand.exists():
            try:
                return int(cand.read_text().splitlines()[0])
            except (ValueError, IndexError):
                return None
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, kernel, Python, load average."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    governor = ""
    gov = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if gov.exists():
        governor = gov.read_text().strip()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    info: dict[str, Any] = {
        "cpu_model": model,
        "logical_cpus": psutil.cpu_count(),
        "usable_cpus": affinity,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_governor": governor or "unknown",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import grpc

        info["grpcio"] = grpc.__version__
    except ImportError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parents[1], timeout=5).stdout.strip()
        info["git"] = rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def wait_for_endpoints(up: subprocess.Popen[bytes], path: Path, log: Path, what: str,
                       timeout_s: float = 180.0) -> dict[str, Any]:
    """The endpoints file an ``igw up`` writes once its services serve (raises if it exits first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if up.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{what} exited with {up.returncode}:\n{tail}")
        if path.exists():
            try:
                return dict(json.loads(path.read_text()))
            except ValueError:
                pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not write {path.name} within {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen[bytes] | None, wait_s: float = 60.0) -> None:
    """SIGTERM, then SIGKILL after ``wait_s`` (an ``igw up`` stops its services on SIGTERM)."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
