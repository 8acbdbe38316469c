"""When the agents' client builds a new channel to a router (igw.client._identity.Link.due)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from igw.client import ClientConfigError
from igw.client._config import ClientConfig
from igw.client._identity import Link, identity_dns_name, native_options, stamps_of
from igw.client._spiffe import TlsFiles


@pytest.fixture
def files(tmp_path: Path) -> TlsFiles:
    for name in ("agent.pem", "agent-key.pem", "ca.pem"):
        (tmp_path / name).write_text(name)
    return TlsFiles(tmp_path / "agent.pem", tmp_path / "agent-key.pem", tmp_path / "ca.pem")


def _link(files: TlsFiles, mode: str, decided: bool = True) -> Link:
    link = Link(object(), mode, decided, stamps_of(files))
    link.looked_at -= 2.0  # as if made two seconds ago
    return link


def _touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_native_link_is_renewed_when_the_files_change_and_looked_at_once_a_second(files: TlsFiles) -> None:
    link = _link(files, "native")
    assert not link.due(files)  # nothing changed
    _touch(files.cert)
    assert not link.due(files)  # looked at less than a second ago
    link.looked_at -= 2.0
    assert link.due(files)


def test_a_tunnel_link_follows_the_files_by_itself(files: TlsFiles) -> None:
    link = _link(files, "tunnel")
    _touch(files.key)
    assert not link.due(files)


def test_a_file_missing_mid_rotation_keeps_the_channel(files: TlsFiles) -> None:
    link = _link(files, "native")
    files.ca.unlink()
    assert stamps_of(files) == ()
    assert not link.due(files)


@pytest.mark.parametrize("mode", ["native", "tunnel"])
def test_an_undecided_or_doubted_link_is_probed_again(files: TlsFiles, mode: str) -> None:
    assert _link(files, mode, decided=False).due(files)
    doubted = _link(files, mode)
    doubted.doubted = True
    assert doubted.due(files)


def test_the_native_channel_checks_the_identitys_dns_name() -> None:
    assert native_options("spiffe://igw.local/router") == [
        ("grpc.ssl_target_name_override", "router.igw.local.spiffe.invalid")]
    assert identity_dns_name("spiffe://igw.local/team/t1/agent/a1") is None
    with pytest.raises(ValueError):
        native_options("spiffe://igw.local/team/t1/agent/a1")


def test_the_identity_check_is_configured_and_checked(files: TlsFiles, tmp_path: Path) -> None:
    env = {"IGW_ROUTER_ADDRS": "127.0.0.1:1", "IGW_TLS_CERT": str(files.cert), "IGW_TLS_KEY": str(files.key),
           "IGW_TLS_CA": str(files.ca)}
    assert ClientConfig.from_env(env).identity_check == "auto"
    assert ClientConfig.from_env({**env, "IGW_IDENTITY_CHECK": "uri"}).identity_check == "uri"
    with pytest.raises(ClientConfigError) as exc:
        ClientConfig.from_env({**env, "IGW_IDENTITY_CHECK": "dns"})
    assert exc.value.reason == "BAD_IDENTITY_CHECK"
