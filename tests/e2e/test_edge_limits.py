"""The HTTPS edge's limits with real sockets: slow, idle, half-open and greedy clients.

A router process of its own, with short edge timeouts (1 s) and a small body cap, next to
the session gateway's ledger, vault and fake providers.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest

from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw_dev import pki as pki_mod
from igw_dev.procs import ServiceProcess, start_service, tls_env
from tests.e2e.conftest import Gateway

TIMEOUT_S = 1.0
SLACK_S = 4.0
AGENT = "agent-demo-quickstart"


def _config(fakes: dict[str, Any]) -> str:
    return f"""
providers:
  fake-openai: {{type: openai, base_url: "{fakes['fake-openai']}/v1", local: true}}
deployments:
  oa: {{provider: fake-openai, model: fake-small, price: fake-small}}
  oa-limited: {{provider: fake-openai, model: fake-limited, price: fake-small}}
models:
  solo: {{candidates: [oa]}}
  limited: {{candidates: [oa-limited]}}
retries: {{max_attempts: 1, backoff_initial_ms: 20, backoff_max_ms: 100, retry_after_cap_ms: 500}}
timeouts: {{connect_ms: 500, first_byte_ms: 5000, idle_ms: 5000, total_ms: 20000}}
limits: {{max_in_flight: 2, max_messages: 5}}
"""


@pytest.fixture(scope="module")
def router(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("edge-limits")
    cfg = tmp / "router.yaml"
    cfg.write_text(_config(gateway.endpoints["fakes"]))  # type: ignore[arg-type]
    seconds = str(TIMEOUT_S)
    tls = tmp / "tls"  # its own copy of the router's files: one test rotates them
    tls.mkdir()
    for name in ("router.pem", "router-key.pem", "ca.pem"):
        shutil.copy(gateway.pki / name, tls / name)
    env = {**tls_env(tls, "router"), "IGW_ROUTER_CONFIG": str(cfg),
           "IGW_LEDGER_ADDR": gateway.addr("ledger"), "IGW_KEYVAULT_ADDR": gateway.addr("keyvault"),
           "IGW_ROUTER_HTTP_LISTEN": "127.0.0.1:0", "IGW_ROUTER_HTTP_HANDSHAKE_TIMEOUT_SECONDS": seconds,
           "IGW_ROUTER_HTTP_IDLE_TIMEOUT_SECONDS": seconds, "IGW_ROUTER_HTTP_BODY_TIMEOUT_SECONDS": seconds,
           "IGW_ROUTER_HTTP_MAX_CONNECTIONS": "16", "IGW_ROUTER_HTTP_MAX_BODY_BYTES": "65536"}
    proc = start_service("router", env, tmp)
    assert proc.http_port
    try:
        yield proc
    finally:
        proc.terminate()


@pytest.fixture(autouse=True)
def _clear_faults(gateway: Gateway) -> Iterator[None]:
    yield
    httpx.delete(f"{gateway.endpoints['fakes']['fake-openai']}/_fake/faults", timeout=10)  # type: ignore[index]


def _ctx(pki: Path, cert: str | None = AGENT) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}-key.pem"))
    return ctx


def _tls(router: ServiceProcess, pki: Path) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", router.http_port), timeout=10)
    return _ctx(pki).wrap_socket(raw, server_hostname="127.0.0.1")


def _closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``sock`` (reading and discarding), failing after ``limit``."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionError, ssl.SSLError):
        pass
    except TimeoutError:
        raise AssertionError(f"connection still open after {limit}s") from None
    return time.monotonic() - t0


def _client(router: ServiceProcess, pki: Path) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"https://127.0.0.1:{router.http_port}/v1", api_key="unused", max_retries=0,
                         http_client=httpx2.Client(verify=_ctx(pki), timeout=30))


def _fast_call_works(router: ServiceProcess, pki: Path) -> None:
    t0 = time.monotonic()
    resp = _client(router, pki).chat.completions.create(model="solo", messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=8)
    assert resp.choices[0].message.content and time.monotonic() - t0 < 5


def test_a_connection_that_never_starts_tls_is_closed_after_the_handshake_timeout(
    router: ServiceProcess, gateway: Gateway,
) -> None:
    t0 = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", router.http_port), timeout=10)
    _fast_call_works(router, gateway.pki)  # the silent peer holds nothing anyone else needs
    _closed_within(sock, TIMEOUT_S + SLACK_S)
    assert time.monotonic() - t0 >= TIMEOUT_S * 0.9  # closed by the timeout, not at once
    sock.close()


def test_headers_trickled_byte_by_byte_are_cut_off_at_the_idle_timeout(
    router: ServiceProcess, gateway: Gateway,
) -> None:
    sock = _tls(router, gateway.pki)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n")
    stop = threading.Event()

    def drip() -> None:
        for ch in b"X-Slow: " + b"a" * 200:
            if stop.wait(0.2):
                return
            try:
                sock.sendall(bytes([ch]))
            except OSError:
                return

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    try:
        elapsed = _closed_within(sock, TIMEOUT_S + SLACK_S)
    finally:
        stop.set()
        t.join()
        sock.close()
    assert elapsed < TIMEOUT_S + SLACK_S


def test_an_idle_keep_alive_connection_is_closed(
    router: ServiceProcess, gateway: Gateway,
) -> None:
    sock = _tls(router, gateway.pki)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: edge\r\n\r\n")
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    _closed_within(sock, TIMEOUT_S + SLACK_S)
    sock.close()


def test_a_body_that_never_arrives_gets_a_400_and_the_connection_back(
    router: ServiceProcess, gateway: Gateway,
) -> None:
    sock = _tls(router, gateway.pki)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 5000\r\n\r\n{\"model\": ")
    sock.settimeout(TIMEOUT_S + SLACK_S)
    data = b""
    try:
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise AssertionError("no answer to a stalled body") from None
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 400") and b"BODY_TIMEOUT" in data


def test_an_oversized_body_is_refused_with_413_in_the_apis_shape(
    router: ServiceProcess, gateway: Gateway,
) -> None:
    with pytest.raises(openai.APIStatusError) as exc:
        _client(router, gateway.pki).chat.completions.create(
            model="solo", messages=[{"role": "user", "content": "x" * 100_000}])
    assert exc.value.status_code == 413 and exc.value.code == "body_too_large"


def test_more_messages_than_the_configured_cap_is_a_400_naming_messages(
    router: ServiceProcess, gateway: Gateway,
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        _client(router, gateway.pki).chat.completions.create(
            model="solo", messages=[{"role": "user", "content": f"m{i}"} for i in range(6)])
    assert exc.value.param == "messages" and exc.value.code == "too_many_messages"


def test_connections_over_the_cap_are_dropped_and_the_edge_recovers(
    router: ServiceProcess, gateway: Gateway,
) -> None:
    held = [_tls(router, gateway.pki) for _ in range(16)]
    try:
        extra = _tls(router, gateway.pki)
        extra.sendall(b"GET /v1/models HTTP/1.1\r\nHost: edge\r\n\r\n")
        _closed_within(extra, SLACK_S)  # dropped, no answer
        extra.close()
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            _fast_call_works(router, gateway.pki)
            break
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_calls_over_max_in_flight_are_refused_with_429_and_retry_after(
    router: ServiceProcess, gateway: Gateway,
) -> None:
    httpx.post(f"{gateway.endpoints['fakes']['fake-openai']}/_fake/faults", timeout=10,  # type: ignore[index]
               json=[{"mode": "ok", "delay_ms": 1500, "match_model": "fake-small"}])
    results: list[Any] = []
    client = _client(router, gateway.pki)

    def one() -> None:
        try:
            results.append(client.chat.completions.create(model="solo", max_tokens=8,
                                                           messages=[{"role": "user", "content": "hi"}]))
        except openai.APIStatusError as err:
            results.append(err)

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(refused) == 3 and len(results) == 5
    assert all(r.status_code == 429 and r.code == "router_overloaded" for r in refused)
    assert all(int(r.response.headers["retry-after"]) >= 1 for r in refused)


def test_a_provider_rate_limit_reaches_the_sdk_with_retry_after(
    router: ServiceProcess, gateway: Gateway,
) -> None:
    httpx.post(f"{gateway.endpoints['fakes']['fake-openai']}/_fake/faults", timeout=10,  # type: ignore[index]
               json=[{"status": 429, "retry_after": 3, "match_model": "fake-limited"}])
    with pytest.raises(openai.APIStatusError) as exc:
        _client(router, gateway.pki).chat.completions.create(
            model="limited", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code in (429, 503)
    assert int(exc.value.response.headers["retry-after"]) >= 1
    assert "hi" not in exc.value.response.text.replace("\"", " ").split()  # no prompt text in the body


def test_a_caller_hanging_up_mid_stream_cancels_upstream_and_settles_once(
    router: ServiceProcess, gateway: Gateway,
) -> None:
    fake = gateway.endpoints["fakes"]["fake-openai"]  # type: ignore[index]
    httpx.post(f"{fake}/_fake/faults", timeout=10, json=[{"mode": "endless", "match_model": "fake-small"}])
    before = httpx.get(f"{fake}/_fake/stats", timeout=10).json().get("cancelled_streams", 0)
    stream = _client(router, gateway.pki).chat.completions.create(
        model="solo", max_tokens=4000, messages=[{"role": "user", "content": "go on forever"}], stream=True)
    rid = ""
    for i, chunk in enumerate(stream):
        rid = chunk.id.removeprefix("chatcmpl-")
        if i >= 5:
            break
    stream.close()
    ledger = ledger_pb2_grpc.LedgerAdminServiceStub(gateway.channel("ledger"))
    deadline = time.monotonic() + 15
    entries: list[ledger_pb2.SpendEntry] = []
    while time.monotonic() < deadline and not entries:
        resp = ledger.ListSpendEntries(ledger_pb2.ListSpendEntriesRequest(page_size=1000), timeout=10)
        entries = [e for e in resp.entries if e.request_id == rid]
        time.sleep(0.2)
    assert len(entries) == 1 and entries[0].outcome == ledger_pb2.CALL_OUTCOME_CANCELLED
    while httpx.get(f"{fake}/_fake/stats", timeout=10).json().get("cancelled_streams", 0) == before:
        assert time.monotonic() < deadline, "the upstream stream was not cancelled"
        time.sleep(0.2)


def _peer_serial(router: ServiceProcess, pki: Path) -> int:
    from cryptography import x509

    with _tls(router, pki) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der).serial_number


def test_a_certificate_rotated_on_disk_serves_new_connections_without_a_restart(
    router: ServiceProcess, gateway: Gateway,
) -> None:
    before = _peer_serial(router, gateway.pki)
    cert, key = pki_mod.issue_cert((gateway.pki / "ca.pem").read_bytes(), (gateway.pki / "ca-key.pem").read_bytes(),
                                   "spiffe://igw.local/router")
    paths = {Path(router.env["IGW_TLS_KEY"]): key, Path(router.env["IGW_TLS_CERT"]): cert}
    for path, data in paths.items():  # key first: the half-rotated pair must keep the old material
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        if path.name.endswith("-key.pem"):
            assert _peer_serial(router, gateway.pki) == before
    deadline = time.monotonic() + 10
    while _peer_serial(router, gateway.pki) == before:
        assert time.monotonic() < deadline, "the new certificate was never served"
        time.sleep(0.1)
    _fast_call_works(router, gateway.pki)
    assert "TLS certificate reloaded from disk (HTTPS edge)" in router.log_text()
