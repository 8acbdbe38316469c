"""Call edges with real processes: a failure says its cause and is never multiplied, hostile
inputs are refused with the right status, providers get exactly what the agent sent.

A router process runs here next to the gateway's (`igw up`) with a config of its own: a
provider whose key the fake refuses (401), a rate-limited one, and the gateway's fakes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from igw.client import ClientConfig, IgwClient, ModelMisconfigured, RateLimited
from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw.router.v1 import router_pb2
from igw_dev.fakes import FakeProcess
from igw_dev.procs import ServiceProcess, ServiceStartError, start_service, tls_env
from services.common.errors import error_info_from_rpc_error
from tests.e2e.conftest import ROOT, Gateway, mtls_channel

RIGHT_KEY = f"sk-right-{uuid.uuid4().hex}"
WRONG_KEY = f"sk-wrong-{uuid.uuid4().hex}"

FULL_JSON_SCHEMA = {
    "type": "object",
    "$defs": {"Unit": {"type": "string", "enum": ["c", "f"]}},
    "properties": {"city": {"type": "string"}, "unit": {"anyOf": [{"$ref": "#/$defs/Unit"}, {"type": "null"}]}},
    "required": ["city"],
    "additionalProperties": False,
}


def _stats(fake: FakeProcess) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{fake.root_url}/_fake/stats", timeout=10).json()
    return data


def _fake_requests(root: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = httpx.get(f"{root}/_fake/requests", timeout=10).json()
    return data


class Edges:
    """The extra router and the fakes the tests use."""

    def __init__(self, gw: Gateway, router: ServiceProcess, refuser: FakeProcess, throttled: FakeProcess) -> None:
        self.gw, self.router, self.refuser, self.throttled = gw, router, refuser, throttled
        self.fakes = {k: str(v) for k, v in gw.endpoints["fakes"].items()}  # type: ignore[attr-defined]

    def client(self, **kw: Any) -> IgwClient:
        """The typed client with its default settings (retries included)."""
        pki = self.gw.pki
        return IgwClient(ClientConfig([self.router.address], pki / "agent-demo-quickstart.pem",
                                      pki / "agent-demo-quickstart-key.pem", pki / "ca.pem", **kw))


@pytest.fixture(scope="module")
def edges(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edges]:
    tmp = tmp_path_factory.mktemp("edges")
    refuser = FakeProcess.start("openai", api_key=RIGHT_KEY)
    throttled = FakeProcess.start("openai", api_key=RIGHT_KEY)
    vault = keyvault_pb2_grpc.KeyVaultAdminServiceStub(gateway.channel("keyvault"))
    for provider, url, secret in (("refuser", refuser.base_url, WRONG_KEY),
                                  ("throttled", throttled.base_url, RIGHT_KEY)):
        vault.CreateProviderKey(keyvault_pb2.CreateProviderKeyRequest(
            request_id=uuid.uuid4().hex, name=f"edges-{provider}", provider=provider, secret=secret,
            base_url=url, all_teams=True), timeout=10)
    fakes = {k: str(v) for k, v in gateway.endpoints["fakes"].items()}  # type: ignore[attr-defined]
    config = tmp / "router.yaml"
    config.write_text(f"""
providers:
  refuser: {{type: openai, base_url: "{refuser.base_url}", local: true}}
  throttled: {{type: openai, base_url: "{throttled.base_url}", local: true}}
  nokey: {{type: openai, base_url: "{fakes['fake-openai']}/v1", local: true}}
  fake-openai: {{type: openai, base_url: "{fakes['fake-openai']}/v1", local: true}}
  fake-gemini: {{type: gemini, base_url: "{fakes['fake-gemini']}", local: true}}
deployments:
  refused: {{provider: refuser, model: fake-small, price: fake-small}}
  limited: {{provider: throttled, model: fake-small, price: fake-small}}
  keyless: {{provider: nokey, model: fake-small, price: fake-small}}
  oa: {{provider: fake-openai, model: fake-small, price: fake-small}}
  ge: {{provider: fake-gemini, model: fake-small, price: fake-small}}
models:
  refused: {{candidates: [refused]}}
  keyless: {{candidates: [keyless]}}
  limited: {{candidates: [limited]}}
  openai: {{candidates: [oa]}}
  gemini: {{candidates: [ge]}}
retries: {{max_attempts: 3, backoff_initial_ms: 20, backoff_max_ms: 100, retry_after_cap_ms: 200}}
timeouts: {{connect_ms: 500, first_byte_ms: 3000, idle_ms: 3000, total_ms: 8000}}
breaker: {{failure_threshold: 1000, cooldown_ms: 1000, probe_timeout_ms: 1000}}
""")
    env = {**tls_env(gateway.pki, "router"), "IGW_ROUTER_CONFIG": str(config),
           "IGW_LEDGER_ADDR": gateway.addr("ledger"), "IGW_KEYVAULT_ADDR": gateway.addr("keyvault")}
    router = start_service("router", env, tmp)
    try:
        yield Edges(gateway, router, refuser, throttled)
    finally:
        router.terminate()
        refuser.stop()
        throttled.stop()


# --------------------------------------------------------------------------- point 3: causes, no retries


@pytest.mark.parametrize("streamed", [False, True])
def test_a_key_the_provider_refuses_costs_one_provider_request_through_the_typed_client(
    edges: Edges, streamed: bool
) -> None:
    before = _stats(edges.refuser)
    with edges.client() as client, pytest.raises(ModelMisconfigured) as caught:
        assert client.config.max_attempts > 1  # default settings, which retry what is safe
        if streamed:
            list(client.stream("refused", "hello there"))
        else:
            client.generate("refused", "hello there")
    after = _stats(edges.refuser)
    assert after["requests"] - before["requests"] == 1
    assert after["auth_failures"] - before["auth_failures"] == 1
    err = caught.value
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "PROVIDER_AUTH_FAILED"
    assert not err.retryable
    assert err.attempts == [{"deployment": "refused", "outcome": "AUTH_FAILED", "http_status": "401",
                             "cause": "auth_failed"}]
    assert WRONG_KEY not in str(err) and WRONG_KEY not in repr(err.metadata)


def test_a_key_the_provider_refuses_costs_one_provider_request_through_the_cli_which_prints_the_cause(
    edges: Edges,
) -> None:
    pki = edges.gw.pki
    before = _stats(edges.refuser)["requests"]
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "chat", "--model", "refused", "--address", edges.router.address,
         "--cert", str(pki / "agent-demo-quickstart.pem"), "--key", str(pki / "agent-demo-quickstart-key.pem"),
         "--ca", str(pki / "ca.pem"), "hello there"],
        cwd=ROOT, env={**os.environ, "IGW_ENDPOINTS": str(edges.gw.state_dir / "endpoints.json")},
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert _stats(edges.refuser)["requests"] - before == 1
    assert "FAILED_PRECONDITION PROVIDER_AUTH_FAILED" in proc.stderr
    assert "refused: the provider refused the credential (HTTP 401)" in proc.stderr
    assert "attempt 1: refused auth_failed HTTP 401" in proc.stderr
    assert WRONG_KEY not in proc.stderr + proc.stdout


def test_a_deployment_without_a_key_is_failed_precondition_naming_the_vaults_reason(edges: Edges) -> None:
    with edges.client() as client, pytest.raises(ModelMisconfigured) as caught:
        client.generate("keyless", "hello there")
    err = caught.value
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "NO_CREDENTIAL"
    (attempt,) = err.attempts
    assert attempt["deployment"] == "keyless" and attempt["outcome"] == "NO_CREDENTIAL" and attempt["cause"]


def test_a_rate_limited_provider_gives_resource_exhausted_with_its_retry_after(edges: Edges) -> None:
    httpx.post(f"{edges.throttled.root_url}/_fake/faults", json=[{"status": 429, "retry_after": 3}], timeout=10)
    try:
        before = _stats(edges.throttled)["requests"]
        with edges.client() as client, pytest.raises(RateLimited) as caught:
            client.generate("limited", "hello there")
        sent = _stats(edges.throttled)["requests"] - before
    finally:
        httpx.delete(f"{edges.throttled.root_url}/_fake/faults", timeout=10)
    err = caught.value
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "UPSTREAM_RATE_LIMITED"
    assert err.retry_delay == 3.0
    assert all(a["outcome"] == "RATE_LIMITED" and a["http_status"] == "429" for a in err.attempts)
    # The router's own retries (max_attempts 3), and none from the client on top.
    assert sent == len(err.attempts) == 3


# --------------------------------------------------------------------------- point 5: hostile inputs


def _raw_call(channel: grpc.Channel, method: str, body: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(method)(body, timeout=10)
    return caught.value


def test_garbage_bytes_are_invalid_argument_and_a_denied_caller_is_refused_first(edges: Edges) -> None:
    garbage = b"\xff\xff\xff\xff\x0f\x0a\x80"
    agent = mtls_channel(edges.router.address, edges.gw.pki, "agent-demo-quickstart")
    err = _raw_call(agent, "/igw.router.v1.RouterService/Generate", garbage)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info_from_rpc_error(err)
    assert info is not None and info.reason == "MALFORMED_REQUEST"
    assert "DecodeError" not in (err.details() or "")
    # An agent may not call the ledger: refused before its bytes are looked at.
    on_ledger = mtls_channel(edges.gw.addr("ledger"), edges.gw.pki, "agent-demo-quickstart")
    denied = _raw_call(on_ledger, "/igw.ledger.v1.LedgerService/Reserve", garbage)
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


def test_unknown_enum_values_in_filters_are_refused_naming_the_field(edges: Edges) -> None:
    ledger = ledger_pb2_grpc.LedgerAdminServiceStub(edges.gw.channel("ledger"))
    with pytest.raises(grpc.RpcError) as spend:
        ledger.ListSpend(ledger_pb2.ListSpendRequest(group_by=[77]), timeout=10)  # type: ignore[list-item]
    vault = keyvault_pb2_grpc.KeyVaultAdminServiceStub(edges.gw.channel("keyvault"))
    with pytest.raises(grpc.RpcError) as audit:
        vault.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(action=99), timeout=10)  # type: ignore[arg-type]
    for caught, field in ((spend.value, "group_by"), (audit.value, "action")):
        assert caught.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info_from_rpc_error(caught)
        assert info is not None and info.reason == "UNKNOWN_ENUM_VALUE" and info.metadata["field"] == field


def test_a_ca_certificate_naming_the_router_is_not_the_router(edges: Edges, tmp_path: Path) -> None:
    pki = edges.gw.pki
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca-key.pem").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue intermediate")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://igw.local/router")]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (tmp_path / "rogue.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "rogue-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for pem in ("ca.pem",):
        (tmp_path / pem).write_bytes((pki / pem).read_bytes())
    channel = mtls_channel(edges.gw.addr("ledger"), tmp_path, "rogue")
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Reserve(ledger_pb2.ReserveRequest(request_id=uuid.uuid4().hex, team="demo", agent="x",
                                               model="fake-small", prompt_tokens_upper_bound=1,
                                               max_output_tokens=1, provider="fake-openai"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info_from_rpc_error(caught.value)
    assert info is not None and info.reason == "CA_CERTIFICATE"


def test_the_router_and_the_vault_agree_on_what_local_admits(edges: Edges, tmp_path: Path) -> None:
    """One rule (services.common.egress): an in-cluster http model server is accepted by both;
    a metadata address by neither."""
    vault = keyvault_pb2_grpc.KeyVaultAdminServiceStub(edges.gw.channel("keyvault"))
    in_cluster = "http://vllm.inference.svc:8000/v1"
    created = vault.CreateProviderKey(keyvault_pb2.CreateProviderKeyRequest(
        request_id=uuid.uuid4().hex, name=f"vllm-{uuid.uuid4().hex[:6]}", provider="vllm", secret="sk-vllm-123",
        base_url=in_cluster, all_teams=True), timeout=10)
    assert created.base_url == in_cluster
    with pytest.raises(grpc.RpcError) as refused:
        vault.CreateProviderKey(keyvault_pb2.CreateProviderKeyRequest(
            request_id=uuid.uuid4().hex, name="imds", provider="imds", secret="sk-imds-123",
            base_url="http://169.254.169.254/latest", all_teams=True), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def router_with(url: str) -> ServiceProcess:
        cfg = tmp_path / f"router-{uuid.uuid4().hex[:6]}.yaml"
        cfg.write_text(f"""
providers:
  vllm: {{type: openai_compatible, base_url: "{url}", local: true}}
deployments:
  d: {{provider: vllm, model: m, price: fake-small}}
models:
  m: {{candidates: [d]}}
""")
        env = {**tls_env(edges.gw.pki, "router"), "IGW_ROUTER_CONFIG": str(cfg),
               "IGW_LEDGER_ADDR": edges.gw.addr("ledger"), "IGW_KEYVAULT_ADDR": edges.gw.addr("keyvault")}
        return start_service("router", env, tmp_path / cfg.stem)

    router_with(in_cluster).terminate()
    with pytest.raises(ServiceStartError) as failed:
        router_with("http://169.254.169.254/latest").terminate()
    assert "link-local" in str(failed.value)


# --------------------------------------------------------------------------- point 6: what the agent sent


def test_temperature_reaches_the_provider_as_the_agent_wrote_it(edges: Edges) -> None:
    root = edges.fakes["fake-openai"]
    httpx.delete(f"{root}/_fake/requests", timeout=10)
    with edges.client() as client:
        answer = client.generate("openai", "hello there", temperature=0.7, top_p=0.9, request_id=uuid.uuid4().hex)
    assert answer.text
    sent = [r["body"] for r in _fake_requests(root) if r["body"] and r["body"].get("temperature") is not None]
    assert sent and sent[-1]["temperature"] == 0.7 and sent[-1]["top_p"] == 0.9


def test_a_full_json_schema_tool_reaches_gemini_as_parameters_json_schema(edges: Edges) -> None:
    root = edges.fakes["fake-gemini"]
    httpx.delete(f"{root}/_fake/requests", timeout=10)
    tool = router_pb2.ToolDefinition(name="get_weather", description="weather by city",
                                     parameters_json_schema=json.dumps(FULL_JSON_SCHEMA))
    with edges.client() as client:
        answer = client.generate("gemini", "what is the weather in Paris", tools=[tool])
    assert [c.name for c in answer.tool_calls] == ["get_weather"]
    (decl,) = _fake_requests(root)[-1]["body"]["tools"][0]["functionDeclarations"]
    assert decl["parametersJsonSchema"] == FULL_JSON_SCHEMA and "parameters" not in decl
