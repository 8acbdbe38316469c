"""The KeyVault as a real process: sealed on a bad master key, and a canary key leaks nowhere."""

from __future__ import annotations

import base64
import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from igw.keyvault.v1 import keyvault_pb2 as pb
from igw.keyvault.v1 import keyvault_pb2_grpc as pb_grpc
from igw_dev.procs import ServiceProcess, start_service, tls_env
from services.common.errors import error_info_from_rpc_error

SERVICE_NAMES = ("", "igw.keyvault.v1.KeyVaultService", "igw.keyvault.v1.KeyVaultAdminService")


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _start(pki: Path, url: str, state: Path, master: str | None) -> ServiceProcess:
    env = {**tls_env(pki, "keyvault"), "IGW_DATABASE_URL": url, "IGW_LOG_FORMAT": "json",
           "IGW_VAULT_MASTER_KEY": master or "", "IGW_VAULT_MASTER_KEY_FILE": ""}
    return start_service("keyvault", env, state)


def _channel(pki: Path, proc: ServiceProcess, stem: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(), (pki / f"{stem}-key.pem").read_bytes(), (pki / f"{stem}.pem").read_bytes()
    )
    return grpc.secure_channel(proc.address, creds, options=(("grpc.ssl_target_name_override", "localhost"),))


def _health(proc: ServiceProcess) -> list[int]:
    with grpc.insecure_channel(f"127.0.0.1:{proc.probe_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return [stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status for s in SERVICE_NAMES]


@pytest.fixture
def procs() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for p in started:
        p.terminate()


@pytest.mark.parametrize("problem", ["missing", "short", "not-base64", "wrong"])
def test_a_bad_master_key_seals_the_vault(
    problem: str, pki: Path, fresh_database: str, tmp_path: Path, procs: list[ServiceProcess]
) -> None:
    right = os.urandom(32)
    if problem == "wrong":
        first = _start(pki, fresh_database, tmp_path / "first", base64.b64encode(right).decode())
        procs.append(first)
        with _channel(pki, first, "operator-admin") as ch:
            pb_grpc.KeyVaultAdminServiceStub(ch).CreateProviderKey(pb.CreateProviderKeyRequest(
                request_id="c1", name="k", provider="openai", secret="sk-real-1234567890",
                base_url="https://api.openai.com/v1", all_teams=True), timeout=10)
        first.terminate()
    bad_raw = {"missing": b"", "short": os.urandom(16), "not-base64": b"", "wrong": os.urandom(32)}[problem]
    bad = {"missing": None, "not-base64": "this is not base64 at all!!"}.get(
        problem, base64.b64encode(bad_raw).decode()
    )
    proc = _start(pki, fresh_database, tmp_path / "second", bad)
    procs.append(proc)

    assert _health(proc) == [health_pb2.HealthCheckResponse.NOT_SERVING] * 3
    with _channel(pki, proc, "router") as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.KeyVaultServiceStub(ch).IssueCredential(
                pb.IssueCredentialRequest(provider="openai", team="demo", model="m", request_id="r1"), timeout=10
            )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info_from_rpc_error(info.value).reason == "MASTER_KEY_UNAVAILABLE"  # type: ignore[union-attr]
    with _channel(pki, proc, "operator-admin") as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.KeyVaultAdminServiceStub(ch).ListProviderKeys(pb.ListProviderKeysRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    proc.terminate()
    log = proc.log_text()
    errors = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"ERROR"' in line]
    assert len(errors) == 1, log
    assert "vault sealed" in errors[0]["msg"]
    expected = {"missing": "no master key", "short": "16 bytes", "not-base64": "not valid base64",
                "wrong": "is not the one"}[problem]
    assert expected in errors[0]["msg"]
    for form in (bad_raw.hex(), base64.b64encode(bad_raw).decode(), base64.urlsafe_b64encode(bad_raw).decode(),
                 right.hex(), base64.b64encode(right).decode()):
        if len(form) > 4:
            assert form not in log


def _forms(canary: str) -> list[str]:
    raw = canary.encode()
    return [
        canary,
        canary.split("sk-", 1)[1],  # catches a redactor that only masks the "sk-" shape
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        json.dumps(canary)[1:-1],
        json.dumps(canary, ensure_ascii=True),
        raw.hex(),
    ]


def test_a_canary_key_appears_in_no_log_error_audit_record_or_metric(
    pki: Path, fresh_database: str, tmp_path: Path, procs: list[ServiceProcess]
) -> None:
    canary = f"sk-CANARY-{uuid.uuid4()}"
    canary2 = f"sk-CANARY-{uuid.uuid4()}"
    proc = _start(pki, fresh_database, tmp_path, base64.b64encode(os.urandom(32)).decode())
    procs.append(proc)
    errors: list[str] = []

    def expect_error(fn: object, *args: object) -> None:
        try:
            fn(*args, timeout=10)  # type: ignore[operator]
        except grpc.RpcError as err:
            errors.append(f"{err.code()} {err.details()} {err.trailing_metadata()!r} {err.debug_error_string()}")
            info = error_info_from_rpc_error(err)
            errors.append(str(info))
            return
        raise AssertionError("the call should have failed")

    with _channel(pki, proc, "operator-admin") as op_ch, _channel(pki, proc, "router") as r_ch:
        admin = pb_grpc.KeyVaultAdminServiceStub(op_ch)
        router = pb_grpc.KeyVaultServiceStub(r_ch)
        created = admin.CreateProviderKey(pb.CreateProviderKeyRequest(
            request_id="c1", name="canary-key", provider="openai", secret=canary,
            base_url="https://api.openai.com/v1", allowed_teams=["demo"]), timeout=10)
        lease = router.IssueCredential(pb.IssueCredentialRequest(
            provider="openai", team="demo", model="gpt-4o", request_id="i1"), timeout=10)
        assert lease.secret == canary  # the one place it may appear
        shown = [str(created), repr(created.SerializeToString())]
        # Failed calls, with the canary in every field it could be pasted into.
        expect_error(router.IssueCredential, pb.IssueCredentialRequest(
            provider="openai", team="not-allowed", model="gpt-4o", request_id="i2"))
        expect_error(router.IssueCredential, pb.IssueCredentialRequest(
            provider=canary, team="demo", model="gpt-4o", request_id="i3"))
        expect_error(router.IssueCredential, pb.IssueCredentialRequest(
            provider="openai", team="demo", model=canary + " x", request_id=canary + "!"))
        expect_error(admin.CreateProviderKey, pb.CreateProviderKeyRequest(
            request_id="c2", name="canary-key", provider="openai", secret=canary,
            base_url="https://api.openai.com/v1", all_teams=True))  # ALREADY_EXISTS
        expect_error(admin.CreateProviderKey, pb.CreateProviderKeyRequest(
            request_id="c1", name="canary-key", provider="openai", secret=canary2,
            base_url="https://api.openai.com/v1", all_teams=True))  # same request id, other payload
        expect_error(admin.CreateProviderKey, pb.CreateProviderKeyRequest(
            request_id="c3", name=canary + "/x", provider="openai", secret=canary,
            base_url="https://api.openai.com/v1", all_teams=True))
        expect_error(admin.CreateProviderKey, pb.CreateProviderKeyRequest(
            request_id="c4", name="other", provider="openai", secret=canary,
            base_url=f"http://{canary}.example.com/", all_teams=True))
        expect_error(admin.CreateProviderKey, pb.CreateProviderKeyRequest(
            request_id="c5", name="other", provider="openai", secret=canary + "\n",
            base_url="https://api.openai.com/v1", all_teams=True))
        expect_error(admin.RotateProviderKey, pb.RotateProviderKeyRequest(
            request_id="r0", name="missing-key", secret=canary2))
        expect_error(admin.RotateProviderKey, pb.RotateProviderKeyRequest(
            request_id="r0b", name="canary-key", secret=canary2, grace_period=duration_pb2.Duration(seconds=-5)))
        shown.append(str(admin.RotateProviderKey(pb.RotateProviderKeyRequest(
            request_id="r1", name="canary-key", secret=canary2), timeout=10)))
        lease2 = router.IssueCredential(pb.IssueCredentialRequest(
            provider="openai", team="demo", model="gpt-4o", request_id="i4"), timeout=10)
        assert lease2.secret == canary2 and lease2.key_version == 2
        shown.append(str(admin.DisableProviderKey(pb.DisableProviderKeyRequest(request_id="d1", name="canary-key"),
                                                  timeout=10)))
        expect_error(router.IssueCredential, pb.IssueCredentialRequest(
            provider="openai", team="demo", model="gpt-4o", request_id="i5"))
        expect_error(admin.RotateProviderKey, pb.RotateProviderKeyRequest(
            request_id="r2", name="canary-key", secret=canary))
        shown.append(str(admin.ListProviderKeys(pb.ListProviderKeysRequest(), timeout=10)))
        events = admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000), timeout=10)
        shown.append(str(events))
        assert admin.VerifyAuditLog(pb.VerifyAuditLogRequest(), timeout=10).ok

    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert "igw_keyvault_leases_issued_total" in metrics and "igw_keyvault_audit_write_seconds" in metrics
    assert 'reason="TEAM_NOT_ALLOWED"' in metrics
    with psycopg.connect(_libpq(fresh_database)) as conn:
        audit_dump = "\n".join(repr(r) for r in conn.execute("SELECT * FROM audit_events ORDER BY sequence"))
        meta_dump = "\n".join(repr(r) for r in conn.execute(
            "SELECT name, provider, base_url, allowed_teams, labels FROM provider_keys"))
        idem_dump = "\n".join(repr(r) for r in conn.execute("SELECT * FROM admin_requests"))
        blobs = b"".join(bytes(c) for r in conn.execute(
            "SELECT ciphertext, wrapped_data_key FROM key_versions") for c in r)
    assert "DENIED" in audit_dump and "TEAM_NOT_ALLOWED" in audit_dump
    proc.terminate()
    log = proc.log_text()
    assert "rpc" in log  # failed calls were logged (without their payloads)

    sinks = {"log": log, "errors": "\n".join(errors), "audit": audit_dump, "metrics": metrics,
             "metadata": meta_dump + idem_dump, "admin responses": "\n".join(shown)}
    for secret in (canary, canary2):
        assert secret.encode() not in blobs
        for form in _forms(secret):
            for sink, text in sinks.items():
                assert form not in text, f"a form of the canary leaked into the {sink}"
