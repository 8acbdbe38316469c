"""The KeyVault in-process against a real Postgres, called over mTLS with real certificates.

Also home of the vault fixtures the other ``test_vault_*`` modules import.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2

from igw.keyvault.v1 import keyvault_pb2 as pb
from igw.keyvault.v1 import keyvault_pb2_grpc as pb_grpc
from services.common.errors import error_info_from_rpc_error
from services.common.server import ServiceRuntime
from services.common.settings import RuntimeSettings
from services.common.tls import secure_channel
from services.keyvault.config import Settings
from services.keyvault.crypto import MasterKey
from services.keyvault.importenv import import_env_async
from services.keyvault.server import build


class FakeClock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def advance(self, delta: dt.timedelta) -> None:
        self.offset += delta


def libpq(url: str) -> str:
    """The libpq form of a postgresql+psycopg SQLAlchemy URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def vault_settings(pki: Path, url: str, master: bytes | None, **overrides: Any) -> Settings:
    runtime = RuntimeSettings.from_env(
        "keyvault",
        {
            "IGW_TLS_CERT": str(pki / "keyvault.pem"), "IGW_TLS_KEY": str(pki / "keyvault-key.pem"),
            "IGW_TLS_CA": str(pki / "ca.pem"), "IGW_GRACE_SECONDS": "0.2",
        },
    )
    values: dict[str, Any] = {
        "runtime": runtime, "database_url": url, "master_key": MasterKey(master) if master else None,
        "master_key_problem": "" if master else "no master key: set IGW_VAULT_MASTER_KEY",
        "lease_ttl_seconds": 30, "lease_max_ttl_seconds": 60, "grace_seconds": 3600,
        "key_cache_seconds": 5.0, "migrate": True, "audit_lock_timeout_ms": 500,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Vault:
    """A running in-process vault and stubs for each kind of caller."""

    runtime: ServiceRuntime
    url: str
    master: bytes
    clock: FakeClock
    router: pb_grpc.KeyVaultServiceStub
    admin: pb_grpc.KeyVaultAdminServiceStub
    agent: pb_grpc.KeyVaultServiceStub
    operator_issue: pb_grpc.KeyVaultServiceStub
    router_admin: pb_grpc.KeyVaultAdminServiceStub
    channels: list[grpc.aio.Channel]

    @property
    def service(self) -> Any:
        return self.runtime.vault  # type: ignore[attr-defined]

    async def create(self, name: str, provider: str = "openai", secret: str | None = None, **kw: Any) -> pb.ProviderKey:
        kw.setdefault("base_url", "https://api.example.com/v1")
        if "allowed_teams" not in kw:
            kw.setdefault("all_teams", True)
        return await self.admin.CreateProviderKey(
            pb.CreateProviderKeyRequest(
                request_id=kw.pop("request_id", uuid.uuid4().hex), name=name, provider=provider,
                secret=secret or f"sk-test-{uuid.uuid4().hex}", **kw,
            )
        )

    async def issue(self, provider: str = "openai", team: str = "demo", **kw: Any) -> pb.IssueCredentialResponse:
        return await self.router.IssueCredential(
            pb.IssueCredentialRequest(
                provider=provider, team=team, model=kw.pop("model", "gpt-4o"),
                request_id=kw.pop("request_id", uuid.uuid4().hex), **kw,
            )
        )

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(libpq(self.url), autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


def _channel(pki: Path, port: int, stem: str) -> grpc.aio.Channel:
    return secure_channel(f"127.0.0.1:{port}", pki / f"{stem}.pem", pki / f"{stem}-key.pem", pki / "ca.pem")


async def start_vault(pki: Path, url: str, master: bytes | None, clock: FakeClock | None = None,
                      **overrides: Any) -> Vault:
    clock = clock or FakeClock()
    runtime = await build(vault_settings(pki, url, master, **overrides), clock=clock)
    await runtime.start()
    router, op, agent = (_channel(pki, runtime.port, s) for s in ("router", "operator-admin", "agent-demo-quickstart"))
    return Vault(
        runtime, url, master or b"", clock,
        router=pb_grpc.KeyVaultServiceStub(router), admin=pb_grpc.KeyVaultAdminServiceStub(op),
        agent=pb_grpc.KeyVaultServiceStub(agent), operator_issue=pb_grpc.KeyVaultServiceStub(op),
        router_admin=pb_grpc.KeyVaultAdminServiceStub(router), channels=[router, op, agent],
    )


async def stop_vault(v: Vault) -> None:
    for ch in v.channels:
        await ch.close()
    await v.runtime.stop()


@pytest.fixture
async def vault(pki: Path, fresh_database: str) -> AsyncIterator[Vault]:
    v = await start_vault(pki, fresh_database, os.urandom(32))
    try:
        yield v
    finally:
        await stop_vault(v)


def reason_of(err: grpc.aio.AioRpcError) -> str:
    info = error_info_from_rpc_error(err)
    return info.reason if info else ""


# ---------------------------------------------------------------------------- tests


async def test_issue_credential_returns_a_lease_and_audits_it_durably_first(vault: Vault) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}"
    created = await vault.create("openai-1", secret=secret, base_url="https://api.openai.com/v1")
    assert created.current_version == 1 and created.state == pb.KEY_STATE_ACTIVE
    assert secret not in str(created)
    before = dt.datetime.now(dt.UTC)
    lease = await vault.issue(request_id="call-1", model="gpt-4o-mini")
    assert lease.secret == secret
    assert (lease.key_name, lease.key_version, lease.base_url) == ("openai-1", 1, "https://api.openai.com/v1")
    assert len(lease.lease_id) == 32 and int(lease.lease_id, 16) >= 0
    ttl = lease.expire_time.ToDatetime(dt.UTC) - before
    assert dt.timedelta(seconds=29) < ttl <= dt.timedelta(seconds=31)
    rows = vault.sql(
        "SELECT actor, action, outcome, key_name, key_version, team, model, lease_id_hmac FROM audit_events "
        "WHERE request_id = 'call-1'"
    )
    assert rows == [(
        "spiffe://igw.local/router", "ISSUE_CREDENTIAL", "ALLOWED", "openai-1", 1, "demo", "gpt-4o-mini",
        vault.service._master.lease_hmac(lease.lease_id),
    )]
    assert lease.lease_id not in str(rows)
    verdict = await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert verdict.ok and verdict.records_checked == 2  # create + issue


async def test_every_lease_ends_visibly_used_or_returned_with_its_reason(vault: Vault) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}"
    await vault.create("openai-1", secret=secret)
    used = await vault.issue(request_id="call-used", team="demo", model="gpt-4o")
    returned = await vault.issue(request_id="call-refused", team="demo", model="gpt-4o")
    await vault.router.EndLease(pb.EndLeaseRequest(
        lease_id=used.lease_id, end=pb.LEASE_END_USED, reason="SUCCESS", request_id="call-used", provider="openai",
        team="demo", model="gpt-4o", key_name=used.key_name, key_version=used.key_version))
    await vault.router.EndLease(pb.EndLeaseRequest(
        lease_id=returned.lease_id, end=pb.LEASE_END_RETURNED, reason="BUDGET_EXCEEDED",
        request_id="call-refused", provider="openai", team="demo", model="gpt-4o", key_name=returned.key_name,
        key_version=returned.key_version))
    rows = vault.sql("SELECT request_id, action, outcome, reason, key_name, team, lease_id_hmac FROM audit_events"
                     " WHERE request_id LIKE 'call-%%' ORDER BY sequence")
    hmac_of = vault.service._master.lease_hmac
    assert rows == [
        ("call-used", "ISSUE_CREDENTIAL", "ALLOWED", "", "openai-1", "demo", hmac_of(used.lease_id)),
        ("call-refused", "ISSUE_CREDENTIAL", "ALLOWED", "", "openai-1", "demo", hmac_of(returned.lease_id)),
        ("call-used", "LEASE_USED", "ALLOWED", "SUCCESS", "openai-1", "demo", hmac_of(used.lease_id)),
        ("call-refused", "LEASE_RETURNED", "ALLOWED", "BUDGET_EXCEEDED", "openai-1", "demo",
         hmac_of(returned.lease_id)),
    ]
    dump = str(vault.sql("SELECT * FROM audit_events"))
    assert secret not in dump and used.lease_id not in dump and returned.lease_id not in dump
    # An auditor filters by action.
    page = await vault.admin.ListAuditEvents(pb.ListAuditEventsRequest(action=pb.AUDIT_ACTION_LEASE_RETURNED))
    assert [(e.request_id, e.reason) for e in page.events] == [("call-refused", "BUDGET_EXCEEDED")]
    assert (await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())).ok


async def test_end_lease_is_for_the_router_only_and_refuses_bad_input(vault: Vault) -> None:
    good = pb.EndLeaseRequest(lease_id="ab" * 16, end=pb.LEASE_END_RETURNED, reason="CANCELLED", request_id="r1",
                              provider="openai", team="demo")
    for stub in (vault.agent, vault.operator_issue):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.EndLease(good)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    bad: list[dict[str, Any]] = [
        {"end": pb.LEASE_END_UNSPECIFIED}, {"lease_id": ""}, {"lease_id": "x" * 65}, {"reason": "free text"},
        {"request_id": ""}, {"provider": "Bad Provider"}, {"team": ""},
    ]
    for change in bad:
        req = pb.EndLeaseRequest()
        req.CopyFrom(good)
        for k, v in change.items():
            setattr(req, k, v)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await vault.router.EndLease(req)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, change
    assert vault.sql("SELECT count(*) FROM audit_events WHERE action LIKE 'LEASE_%%'") == [(0,)]


async def test_lease_ends_in_a_batch_are_audited_together_in_one_group_commit(vault: Vault) -> None:
    await vault.create("openai-1")
    leases = [await vault.issue(request_id=f"batch-{i}", team="demo", model="gpt-4o") for i in range(5)]
    ends = [
        pb.EndLeaseRequest(
            lease_id=lease.lease_id, end=pb.LEASE_END_USED if i % 2 == 0 else pb.LEASE_END_RETURNED,
            reason="SUCCESS" if i % 2 == 0 else "CANCELLED", request_id=f"batch-{i}", provider="openai",
            team="demo", model="gpt-4o", key_name=lease.key_name, key_version=lease.key_version)
        for i, lease in enumerate(leases)
    ]
    await vault.router.EndLeaseBatch(pb.EndLeaseBatchRequest(items=ends))
    rows = vault.sql("SELECT sequence, created_at, request_id, action, reason, lease_id_hmac FROM audit_events"
                     " WHERE action LIKE 'LEASE_%%' ORDER BY sequence")
    hmac_of = vault.service._master.lease_hmac
    assert [(r[2], r[3], r[4], r[5]) for r in rows] == [
        (f"batch-{i}", "LEASE_USED" if i % 2 == 0 else "LEASE_RETURNED", "SUCCESS" if i % 2 == 0 else "CANCELLED",
         hmac_of(leases[i].lease_id))
        for i in range(5)
    ]
    # One batch: consecutive records written at one commit time.
    assert [r[0] for r in rows] == list(range(rows[0][0], rows[0][0] + 5))
    assert len({r[1] for r in rows}) == 1
    assert (await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())).ok


async def test_end_lease_batch_is_for_the_router_only_and_refuses_a_bad_item_as_a_whole(vault: Vault) -> None:
    good = pb.EndLeaseRequest(lease_id="ab" * 16, end=pb.LEASE_END_RETURNED, reason="CANCELLED", request_id="r1",
                              provider="openai", team="demo")
    bad = pb.EndLeaseRequest()
    bad.CopyFrom(good)
    bad.reason = "free text"
    for stub in (vault.agent, vault.operator_issue):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.EndLeaseBatch(pb.EndLeaseBatchRequest(items=[good]))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for req, field in [(pb.EndLeaseBatchRequest(items=[good, bad]), "reason"),
                       (pb.EndLeaseBatchRequest(), "items"),
                       (pb.EndLeaseBatchRequest(items=[good] * 257), "items")]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await vault.router.EndLeaseBatch(req)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in str(error_info_from_rpc_error(info.value).metadata)
    assert vault.sql("SELECT count(*) FROM audit_events WHERE action LIKE 'LEASE_%%'") == [(0,)]


async def test_a_key_version_is_decrypted_once_not_per_lease(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.keyvault import crypto

    opened: list[int] = []
    real = crypto.open_secret

    def counting(data_key: bytes, name: str, provider: str, version: int, sealed: Any) -> bytes:
        opened.append(version)
        return real(data_key, name, provider, version, sealed)

    monkeypatch.setattr(crypto, "open_secret", counting)
    await vault.create("once", secret="sk-once-version-1")
    leases = [await vault.issue() for _ in range(5)]
    assert {lease.secret for lease in leases} == {"sk-once-version-1"}
    assert opened == [1]
    # A rotation drops the cached secret with the cache entry: the new version is decrypted once.
    await vault.admin.RotateProviderKey(pb.RotateProviderKeyRequest(request_id="once-r", name="once",
                                                                    secret="sk-once-version-2"))
    leases = [await vault.issue() for _ in range(3)]
    assert {(lease.key_version, lease.secret) for lease in leases} == {(2, "sk-once-version-2")}
    assert opened == [1, 2]
    # Every lease is still audited before it is handed out.
    assert vault.sql("SELECT count(*) FROM audit_events WHERE action = 'ISSUE_CREDENTIAL'") == [(8,)]


async def test_requested_ttl_is_capped_at_the_maximum(vault: Vault) -> None:
    await vault.create("k")
    now = dt.datetime.now(dt.UTC)
    long = await vault.issue(ttl=duration_pb2.Duration(seconds=3600))
    assert long.expire_time.ToDatetime(dt.UTC) - now <= dt.timedelta(seconds=61)
    short = await vault.issue(ttl=duration_pb2.Duration(seconds=5))
    assert short.expire_time.ToDatetime(dt.UTC) - now <= dt.timedelta(seconds=6)


async def test_agent_and_operator_certificates_may_not_issue_credentials(vault: Vault) -> None:
    await vault.create("k")
    req = pb.IssueCredentialRequest(provider="openai", team="demo", model="m", request_id="x1")
    for stub in (vault.agent, vault.operator_issue):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.IssueCredential(req)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(info.value) == "METHOD_NOT_ALLOWED"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vault.router_admin.ListProviderKeys(pb.ListProviderKeysRequest())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The refused lease requests are in the audit log, with who asked; the refused read is not a key action.
    rows = vault.sql("SELECT actor, action, outcome, reason, provider, team FROM audit_events "
                     "WHERE request_id = 'x1' ORDER BY sequence")
    assert rows == [
        ("spiffe://igw.local/team/demo/agent/quickstart", "ISSUE_CREDENTIAL", "DENIED", "METHOD_NOT_ALLOWED",
         "openai", "demo"),
        ("spiffe://igw.local/operator/admin", "ISSUE_CREDENTIAL", "DENIED", "METHOD_NOT_ALLOWED", "openai", "demo"),
    ]
    assert (await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())).ok


async def test_a_flood_of_refused_calls_from_one_identity_is_audited_only_up_to_a_limit(vault: Vault) -> None:
    req = pb.IssueCredentialRequest(provider="openai", team="demo", model="m", request_id="flood")
    for _ in range(30):
        with pytest.raises(grpc.aio.AioRpcError):
            await vault.agent.IssueCredential(req)
    assert vault.sql("SELECT count(*) FROM audit_events WHERE request_id = 'flood'") == [(20,)]


async def test_a_team_not_allowed_on_any_key_is_denied_and_audited(vault: Vault) -> None:
    await vault.create("team-a-key", allowed_teams=["team-a"])
    assert (await vault.issue(team="team-a")).key_name == "team-a-key"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vault.issue(team="team-b", request_id="denied-1")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(info.value) == "TEAM_NOT_ALLOWED"
    rows = vault.sql("SELECT action, outcome, reason, team, key_name, lease_id_hmac FROM audit_events "
                     "WHERE request_id = 'denied-1'")
    assert rows == [("ISSUE_CREDENTIAL", "DENIED", "TEAM_NOT_ALLOWED", "team-b", "", "")]
    events = await vault.admin.ListAuditEvents(pb.ListAuditEventsRequest(outcome=pb.AUDIT_OUTCOME_DENIED))
    assert [e.request_id for e in events.events] == ["denied-1"]


async def test_a_provider_without_keys_is_denied_and_audited(vault: Vault) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vault.issue(provider="anthropic", request_id="nokey-1")
    assert (info.value.code(), reason_of(info.value)) == (grpc.StatusCode.PERMISSION_DENIED, "NO_KEY_FOR_PROVIDER")
    assert vault.sql("SELECT outcome, reason FROM audit_events WHERE request_id = 'nokey-1'") == [
        ("DENIED", "NO_KEY_FOR_PROVIDER")
    ]


async def test_leases_spread_across_the_keys_of_a_provider(vault: Vault) -> None:
    for i in range(3):
        await vault.create(f"openai-{i}")
    names = [(await vault.issue()).key_name for _ in range(30)]
    assert {names.count(f"openai-{i}") for i in range(3)} == {10}


async def test_a_disabled_key_is_never_leased(vault: Vault) -> None:
    await vault.create("only")
    await vault.issue()
    disabled = await vault.admin.DisableProviderKey(pb.DisableProviderKeyRequest(request_id="d1", name="only"))
    assert disabled.state == pb.KEY_STATE_DISABLED
    assert all(v.state == pb.KEY_STATE_DISABLED for v in disabled.versions)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vault.issue()
    assert reason_of(info.value) == "NO_KEY_FOR_PROVIDER"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vault.admin.RotateProviderKey(pb.RotateProviderKeyRequest(request_id="r1", name="only", secret="sk-x-1"))
    assert (info.value.code(), reason_of(info.value)) == (grpc.StatusCode.FAILED_PRECONDITION, "KEY_DISABLED")


async def test_rotation_moves_leases_to_the_new_version_and_ends_the_old_one_after_grace(vault: Vault) -> None:
    await vault.create("rot", secret="sk-old-version-000000")
    assert (await vault.issue()).key_version == 1
    rotated = await vault.admin.RotateProviderKey(
        pb.RotateProviderKeyRequest(request_id="rot-1", name="rot", secret="sk-new-version-111111",
                                    grace_period=duration_pb2.Duration(seconds=600))
    )
    assert rotated.current_version == 2
    assert [(v.version, v.state) for v in rotated.versions] == [(2, pb.KEY_STATE_ACTIVE), (1, pb.KEY_STATE_GRACE)]
    grace_end = rotated.versions[1].grace_end_time.ToDatetime(dt.UTC)
    assert dt.timedelta(seconds=590) < grace_end - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=600)
    lease = await vault.issue()
    assert (lease.key_version, lease.secret) == (2, "sk-new-version-111111")

    vault.clock.advance(dt.timedelta(seconds=599))
    listed = await vault.admin.ListProviderKeys(pb.ListProviderKeysRequest())
    assert [v.state for v in listed.keys[0].versions] == [pb.KEY_STATE_ACTIVE, pb.KEY_STATE_GRACE]
    vault.clock.advance(dt.timedelta(seconds=2))
    listed = await vault.admin.ListProviderKeys(pb.ListProviderKeysRequest())
    assert [v.state for v in listed.keys[0].versions] == [pb.KEY_STATE_ACTIVE, pb.KEY_STATE_DISABLED]
    assert (await vault.issue()).key_version == 2
    audit = await vault.admin.ListAuditEvents(pb.ListAuditEventsRequest(action=pb.AUDIT_ACTION_ROTATE_KEY))
    assert [(e.key_name, e.key_version, e.request_id) for e in audit.events] == [("rot", 2, "rot-1")]


async def test_rotation_with_no_grace_disables_the_old_version_at_once(vault: Vault) -> None:
    await vault.create("rot0")
    rotated = await vault.admin.RotateProviderKey(
        pb.RotateProviderKeyRequest(request_id="r0", name="rot0", secret="sk-n-2",
                                    grace_period=duration_pb2.Duration(seconds=0))
    )
    assert [v.state for v in rotated.versions] == [pb.KEY_STATE_ACTIVE, pb.KEY_STATE_DISABLED]


async def test_keys_past_their_rotation_period_are_flagged(vault: Vault) -> None:
    await vault.create("due", rotation_period=duration_pb2.Duration(seconds=86400))
    await vault.create("never")
    keys = (await vault.admin.ListProviderKeys(pb.ListProviderKeysRequest())).keys
    assert [(k.name, k.rotation_due) for k in keys] == [("due", False), ("never", False)]
    vault.clock.advance(dt.timedelta(days=1, seconds=1))
    keys = (await vault.admin.ListProviderKeys(pb.ListProviderKeysRequest())).keys
    assert [(k.name, k.rotation_due) for k in keys] == [("due", True), ("never", False)]
    assert keys[0].rotation_period.seconds == 86400


async def test_create_is_idempotent_on_request_id_and_refuses_a_taken_name(vault: Vault) -> None:
    first = await vault.create("dup", secret="sk-a-1", request_id="create-1")
    again = await vault.create("dup", secret="sk-a-1", request_id="create-1")
    assert first == again
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vault.create("dup", secret="sk-a-1", request_id="create-2")
    assert (info.value.code(), reason_of(info.value)) == (grpc.StatusCode.ALREADY_EXISTS, "KEY_EXISTS")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vault.create("dup", secret="sk-a-2", request_id="create-1")
    assert (info.value.code(), reason_of(info.value)) == (grpc.StatusCode.ABORTED, "REQUEST_ID_REUSED")
    rows = vault.sql(
        "SELECT request_id, outcome, reason FROM audit_events WHERE action = 'CREATE_KEY' ORDER BY sequence"
    )
    assert rows == [("create-1", "ALLOWED", ""), ("create-2", "DENIED", "KEY_EXISTS"),
                    ("create-1", "DENIED", "REQUEST_ID_REUSED")]
    assert vault.sql("SELECT count(*) FROM key_versions") == [(1,)]


async def test_bad_arguments_are_refused_without_echoing_them(vault: Vault) -> None:
    cases = [
        dict(name="bad name!"), dict(provider="OpenAI"), dict(base_url="http://169.254.169.254/latest"),
        dict(base_url="http://metadata.google.internal/"),
        dict(base_url="https://u:p@h.example"), dict(secret="x" * 4097), dict(allowed_teams=["a/b"], all_teams=False),
        dict(secret="sk-has\nnewline"),
    ]
    for case in cases:
        args = {"name": "ok", "provider": "openai", "secret": "sk-fine-123", "base_url": "https://h.example",
                "request_id": uuid.uuid4().hex, **case}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await vault.admin.CreateProviderKey(pb.CreateProviderKeyRequest(**args))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        value = next(iter(case.values()))
        assert str(value) not in (info.value.details() or "")
    http_local = await vault.create("local", base_url="http://127.0.0.1:8080/v1")
    assert http_local.base_url == "http://127.0.0.1:8080/v1"
    # An in-cluster model server, as the router's `local: true` admits it (services.common.egress).
    in_cluster = await vault.create("vllm", base_url="http://vllm.inference.svc:8000/v1")
    assert in_cluster.base_url == "http://vllm.inference.svc:8000/v1"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vault.issue(provider="Not A Provider")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_provider_keys_pages_by_name_with_metadata_only(vault: Vault) -> None:
    for i in range(5):
        await vault.create(f"key-{i}", provider="openai" if i % 2 else "anthropic", labels={"env": "prod"})
    seen, token = [], ""
    while True:
        page = await vault.admin.ListProviderKeys(pb.ListProviderKeysRequest(page_size=2, page_token=token))
        seen += [k.name for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"key-{i}" for i in range(5)]
    only = await vault.admin.ListProviderKeys(pb.ListProviderKeysRequest(provider="anthropic"))
    assert [k.name for k in only.keys] == ["key-0", "key-2", "key-4"]
    assert dict(only.keys[0].labels) == {"env": "prod"} and len(only.keys[0].versions[0].fingerprint) == 4
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vault.admin.ListProviderKeys(pb.ListProviderKeysRequest(page_token="garbage"))
    assert reason_of(info.value) == "PAGE_TOKEN_INVALID"


async def test_list_audit_events_pages_newest_first_with_filters(vault: Vault) -> None:
    await vault.create("k")
    for i in range(7):
        await vault.issue(request_id=f"r{i}", team="t1" if i < 4 else "t2")
    seqs, token = [], ""
    while True:
        page = await vault.admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=3, page_token=token))
        seqs += [e.sequence for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert seqs == list(range(8, 0, -1))
    t2 = await vault.admin.ListAuditEvents(pb.ListAuditEventsRequest(team="t2"))
    assert [e.request_id for e in t2.events] == ["r6", "r5", "r4"]
    one = await vault.admin.ListAuditEvents(pb.ListAuditEventsRequest(request_id="r2"))
    assert len(one.events) == 1 and one.events[0].lease_id_hmac.startswith("hmac-sha256:")
    creates = await vault.admin.ListAuditEvents(pb.ListAuditEventsRequest(action=pb.AUDIT_ACTION_CREATE_KEY))
    assert [e.sequence for e in creates.events] == [1]
    future = await vault.admin.ListAuditEvents(
        pb.ListAuditEventsRequest(start_time=_ts(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)))
    )
    assert not future.events


def _ts(value: dt.datetime) -> Any:
    from google.protobuf import timestamp_pb2

    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


async def test_a_ciphertext_moved_to_another_row_in_the_database_fails_closed(vault: Vault) -> None:
    await vault.create("victim", provider="openai", allowed_teams=["a"])
    await vault.create("donor", provider="anthropic", secret="sk-donor-secret-1234")
    # An attacker with DB access copies the donor's encrypted columns into the victim's row.
    vault.sql(
        "UPDATE key_versions v SET ciphertext = d.ciphertext, nonce = d.nonce, wrapped_data_key = d.wrapped_data_key,"
        " wrap_nonce = d.wrap_nonce FROM key_versions d, provider_keys kv, provider_keys kd "
        "WHERE v.key_id = kv.id AND kv.name = 'victim' AND d.key_id = kd.id AND kd.name = 'donor'"
    )
    vault.service.invalidate_cache()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vault.issue(team="a", request_id="moved-1")
    assert (info.value.code(), reason_of(info.value)) == (grpc.StatusCode.INTERNAL, "DECRYPTION_FAILED")
    assert "sk-donor" not in (info.value.details() or "")
    assert vault.sql("SELECT outcome, reason FROM audit_events WHERE request_id = 'moved-1'") == [
        ("DENIED", "DECRYPTION_FAILED")
    ]


async def test_import_env_stores_the_keys_that_are_set(vault: Vault) -> None:
    env = {"OPENAI_API_KEY": "sk-openai-import-1", "GEMINI_API_KEY": "AIza-gemini-import-1", "ANTHROPIC_API_KEY": ""}
    assert await import_env_async(vault.admin, env) == ["openai-env", "gemini-env"]
    assert await import_env_async(vault.admin, env) == []  # already there: left alone
    keys = {k.name: k for k in (await vault.admin.ListProviderKeys(pb.ListProviderKeysRequest())).keys}
    assert keys["openai-env"].base_url == "https://api.openai.com/v1" and keys["openai-env"].all_teams
    assert keys["gemini-env"].base_url == "https://generativelanguage.googleapis.com"
    assert (await vault.issue(provider="gemini", team="anyone")).secret == "AIza-gemini-import-1"


async def test_a_vault_without_master_key_is_sealed(pki: Path, fresh_database: str) -> None:
    v = await start_vault(pki, fresh_database, None)
    try:
        assert v.service.sealed and not v.runtime.serving
        for call in (v.issue(), v.admin.ListProviderKeys(pb.ListProviderKeysRequest()),
                     v.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert (info.value.code(), reason_of(info.value)) == (grpc.StatusCode.UNAVAILABLE, "MASTER_KEY_UNAVAILABLE")
    finally:
        await stop_vault(v)


async def test_a_vault_restarted_with_another_master_key_is_sealed(pki: Path, fresh_database: str) -> None:
    first = await start_vault(pki, fresh_database, os.urandom(32))
    await first.create("k")
    await stop_vault(first)
    second = await start_vault(pki, fresh_database, os.urandom(32))
    try:
        assert second.service.sealed and not second.runtime.serving
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await second.issue()
        assert reason_of(info.value) == "MASTER_KEY_UNAVAILABLE"
    finally:
        await stop_vault(second)
    third = await start_vault(pki, fresh_database, first.master)
    try:
        assert not third.service.sealed
        await third.issue()
    finally:
        await stop_vault(third)



def test_vault_migrations_go_down_and_up_again(fresh_database: str) -> None:
    from services.common.db import downgrade, upgrade

    upgrade("keyvault", fresh_database)
    downgrade("keyvault", fresh_database)
    with psycopg.connect(libpq(fresh_database)) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert not tables & {"provider_keys", "key_versions", "audit_events", "admin_requests", "vault_meta"}
    upgrade("keyvault", fresh_database)


async def test_a_key_disabled_through_one_replica_stops_at_once_on_the_others(pki: Path, vault: Vault) -> None:
    # A long cache on the second replica: only the change notification can make it forget the key.
    other = await start_vault(pki, vault.url, vault.master, key_cache_seconds=60.0)
    try:
        await vault.create("shared")
        assert (await other.issue()).key_name == "shared"  # cached on `other` now
        await vault.admin.DisableProviderKey(pb.DisableProviderKeyRequest(request_id="d1", name="shared"))
        deadline = asyncio.get_running_loop().time() + 2.0
        while True:
            try:
                await other.issue()
            except grpc.aio.AioRpcError as err:
                assert reason_of(err) == "NO_KEY_FOR_PROVIDER"
                break
            assert asyncio.get_running_loop().time() < deadline, "the other replica kept leasing a disabled key"
            await asyncio.sleep(0.05)
    finally:
        await stop_vault(other)


@pytest.mark.parametrize(("field", "value"), [("action", 99), ("outcome", 42)])
async def test_an_unknown_enum_value_in_an_audit_filter_is_refused_naming_the_field(
    vault: Vault, field: str, value: int
) -> None:
    await vault.create("k1")
    everything = await vault.admin.ListAuditEvents(pb.ListAuditEventsRequest())
    assert everything.events  # an ignored filter would return these
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vault.admin.ListAuditEvents(pb.ListAuditEventsRequest(**{field: value}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    detail = error_info_from_rpc_error(info.value)
    assert detail is not None and detail.reason == "UNKNOWN_ENUM_VALUE" and detail.metadata["field"] == field
