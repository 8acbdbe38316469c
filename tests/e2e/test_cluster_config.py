"""One routing config for every router: each follows the file (and its digest pin file) on disk.

The files live behind a Kubernetes-style ``..data`` symlink that is swapped atomically, as the
kubelet does for a ConfigMap. Two router processes pick up a change by themselves within
seconds; a file that does not match its pin, or does not validate, keeps the last good config;
each router's active digest shows in GetConfig and as a metric.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
from pathlib import Path

from igw.router.v1 import router_pb2, router_pb2_grpc
from igw_dev.procs import ServiceProcess, start_service, tls_env
from tests.e2e.conftest import mtls_channel

BASE = """version: 1
providers:
  p: {{type: openai, base_url: "http://127.0.0.1:9/v1", local: true}}
deployments:
  d: {{provider: p, model: m, price: fake-small}}
models:
  {alias}: {{candidates: [d]}}
"""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ConfigMapDir:
    """``<root>/router.yaml`` and ``<root>/router.sha256`` -> ``..data/...``, ``..data`` -> a versioned dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)

    def publish(self, config: str, pin: str) -> None:
        self.version += 1
        d = self.root / f"..v{self.version}"
        d.mkdir()
        (d / "router.yaml").write_text(config)
        (d / "router.sha256").write_text(f"{pin}  router.yaml\n")
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(d.name)
        os.replace(tmp, self.root / "..data")  # the atomic swap
        for name in ("router.yaml", "router.sha256"):
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")


def _get(proc: ServiceProcess, pki: Path) -> router_pb2.GetConfigResponse:
    with mtls_channel(proc.address, pki, "operator-admin") as ch:
        return router_pb2_grpc.RouterAdminServiceStub(ch).GetConfig(router_pb2.GetConfigRequest(), timeout=5)


def _metric_digests(proc: ServiceProcess) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return [line.split('sha256="')[1].split('"')[0] for line in text.splitlines()
            if line.startswith("igw_router_config_info{") and line.endswith(" 1.0")]


def _wait_sha(routers: list[ServiceProcess], pki: Path, sha: str, within: float = 8.0) -> float:
    t0 = time.monotonic()
    while any(_get(r, pki).sha256 != sha for r in routers):
        assert time.monotonic() - t0 < within, [(_get(r, pki).sha256, _get(r, pki).last_reload_error) for r in routers]
        time.sleep(0.1)
    return time.monotonic() - t0


def test_every_router_follows_the_config_file_and_its_pin_and_keeps_the_last_good(tmp_path: Path, pki: Path) -> None:
    cm = ConfigMapDir(tmp_path / "configmap")
    first = BASE.format(alias="fast")
    cm.publish(first, _sha(first))
    env = {**tls_env(pki, "router"), "IGW_ROUTER_CONFIG": str(cm.root / "router.yaml"),
           "IGW_ROUTER_CONFIG_SHA256_FILE": str(cm.root / "router.sha256"),
           # No ledger or vault needed to load config: the router starts not ready.
           "IGW_LEDGER_ADDR": "127.0.0.1:1", "IGW_KEYVAULT_ADDR": "127.0.0.1:1", "IGW_GRACE_SECONDS": "1"}
    routers: list[ServiceProcess] = []
    try:
        for i in range(2):
            routers.append(start_service(f"router-{i}", env, tmp_path / "svc", module="services.router"))
        for r in routers:
            got = _get(r, pki)
            assert got.sha256 == got.pinned_sha256 == _sha(first)
            assert _metric_digests(r) == [_sha(first)]

        # A new config and its new pin, published together: both routers switch within seconds.
        second = BASE.format(alias="smart")
        cm.publish(second, _sha(second))
        took = _wait_sha(routers, pki, _sha(second))
        assert took < 6
        for r in routers:
            got = _get(r, pki)
            assert list(got.aliases) == ["smart"] and got.pinned_sha256 == _sha(second)
            assert got.last_reload_error == ""
            assert _metric_digests(r) == [_sha(second)]  # the old digest's series is gone

        # A config that does not match its pin: refused, the last good config stays.
        third = BASE.format(alias="sneaky")
        cm.publish(third, _sha(second))
        time.sleep(4)
        for r in routers:
            got = _get(r, pki)
            assert got.sha256 == _sha(second)
            assert "does not match" in got.last_reload_error
            assert _metric_digests(r) == [_sha(second)]

        # A config that matches its pin but does not validate: refused too.
        broken = "version: 1\nproviders: [this is not a mapping\n"
        cm.publish(broken, _sha(broken))
        time.sleep(4)
        for r in routers:
            got = _get(r, pki)
            assert got.sha256 == _sha(second) and got.last_reload_error

        # A garbage pin file: refused, nothing changes.
        fourth = BASE.format(alias="fourth")
        cm.publish(fourth, "not-a-digest")
        time.sleep(4)
        assert all(_get(r, pki).sha256 == _sha(second) for r in routers)

        # Fixed: applied, and the error clears.
        cm.publish(fourth, _sha(fourth))
        _wait_sha(routers, pki, _sha(fourth))
        for r in routers:
            assert _get(r, pki).last_reload_error == ""
            assert r.proc.poll() is None
        log = routers[0].log_text()
        assert "config reload rejected; keeping the last good config" in log
    finally:
        for r in routers:
            r.terminate()
