"""The agent client turns the gateway's rich status into typed errors, retries only what is safe,
and refuses bad configuration up front."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from igw.client import (
    AsyncIgwClient,
    BudgetExceeded,
    CertificateExpired,
    ClientConfig,
    ClientConfigError,
    FailedPrecondition,
    IgwClient,
    IgwError,
    InvalidArgument,
    NoBudget,
    NotFound,
    PermissionDenied,
    RateLimited,
    ResourceExhausted,
    Unavailable,
    build_request,
    error_from_rpc_error,
    format_nanos,
    system,
    tool_result,
    user,
)
from igw.router.v1 import router_pb2, router_pb2_grpc
from igw_dev import pki as pki_mod
from services.common import errors as server_errors
from services.common.tls import server_credentials

BUDGET_METADATA = {
    "team": "demo",
    "window": "BUDGET_WINDOW_DAILY",
    "limit_nanos": 5_000_000_000,
    "spent_nanos": 4_999_000_000,
    "held_nanos": 900_000,
    "remaining_nanos": 100_000,
    "requested_nanos": 2_000_000,
}


class _FakeRpcError(grpc.RpcError):
    """What grpc raises on the client side, built from a server-side status."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> Any:
        return self._status.trailing_metadata


def _budget_status() -> grpc.Status:
    err = server_errors.ResourceExhausted("BUDGET_EXCEEDED", "team budget exhausted", BUDGET_METADATA)
    return server_errors.to_status(err, "ledger.igw")


# --------------------------------------------------------------------------- decoding


def test_a_budget_status_from_the_server_becomes_budget_exceeded_with_integer_amounts() -> None:
    error = error_from_rpc_error(_FakeRpcError(_budget_status()))

    assert isinstance(error, BudgetExceeded)
    assert isinstance(error, ResourceExhausted)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "BUDGET_EXCEEDED"
    assert error.domain == "ledger.igw"
    assert error.message == "team budget exhausted"
    assert error.remaining_nanos == 100_000
    assert error.limit_nanos == 5_000_000_000
    assert error.spent_nanos == 4_999_000_000
    assert error.held_nanos == 900_000
    assert error.requested_nanos == 2_000_000
    assert error.remaining_dollars == "$0.0001"
    assert error.metadata["team"] == "demo"
    assert not error.retryable


def test_a_team_without_a_budget_becomes_no_budget_and_is_not_retryable() -> None:
    err = server_errors.FailedPrecondition("NO_BUDGET", "your team has no budget", {"team": "t1", "agent": "a"})
    error = error_from_rpc_error(_FakeRpcError(server_errors.to_status(err, "router.igw")))
    assert isinstance(error, NoBudget) and isinstance(error, FailedPrecondition)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.team == "t1"
    assert not error.retryable


@pytest.mark.parametrize(
    ("server_error", "expected"),
    [
        (server_errors.InvalidArgument("BAD_MODEL_NAME", "bad"), InvalidArgument),
        (server_errors.NotFound("SOMETHING_ELSE", "gone"), NotFound),
        (server_errors.PermissionDenied("METHOD_NOT_ALLOWED", "no"), PermissionDenied),
        (server_errors.Unavailable("LEDGER_UNAVAILABLE", "down"), Unavailable),
        (server_errors.ResourceExhausted("QUOTA", "slow down"), ResourceExhausted),
    ],
)
def test_errors_without_a_known_reason_are_typed_by_their_status_code(
    server_error: server_errors.IgwError, expected: type[IgwError]
) -> None:
    error = error_from_rpc_error(_FakeRpcError(server_errors.to_status(server_error, "router.igw")))

    assert type(error) is expected
    assert error.reason == server_error.reason
    assert error.domain == "router.igw"


def test_an_error_without_details_or_with_a_garbage_trailer_still_carries_its_code() -> None:
    plain = _FakeRpcError(grpc.Status())
    plain._status = type("S", (), {"code": grpc.StatusCode.UNAVAILABLE, "details": "down", "trailing_metadata": ()})()
    assert isinstance(error_from_rpc_error(plain), Unavailable)

    garbage = _FakeRpcError(grpc.Status())
    garbage._status = type(
        "S",
        (),
        {
            "code": grpc.StatusCode.PERMISSION_DENIED,
            "details": "no",
            "trailing_metadata": (("grpc-status-details-bin", b"\xff\xfe not a proto"),),
        },
    )()
    error = error_from_rpc_error(garbage)
    assert isinstance(error, PermissionDenied)
    assert error.reason == ""
    assert error.message == "no"


def test_dollars_are_formatted_exactly_from_nanos() -> None:
    assert format_nanos(1) == "$0.000000001"
    assert format_nanos(1_500_000_000) == "$1.50"
    assert format_nanos(0) == "$0.00"
    assert format_nanos(123_456_789_012) == "$123.456789012"


# --------------------------------------------------------------------------- configuration


def test_config_names_the_missing_file_and_the_variable_to_set(pki: Path) -> None:
    with pytest.raises(ClientConfigError, match=r"client certificate file .*nope\.pem does not exist.*IGW_TLS_CERT"):
        ClientConfig(["127.0.0.1:1"], pki / "nope.pem", pki / "agent-demo-quickstart-key.pem", pki / "ca.pem")


def test_config_refuses_an_expired_client_certificate_with_a_clear_message(pki: Path, tmp_path: Path) -> None:
    cert, key = pki_mod.issue_cert(
        (pki / "ca.pem").read_bytes(),
        (pki / "ca-key.pem").read_bytes(),
        "spiffe://igw.local/team/demo/agent/old",
        valid_for=dt.timedelta(hours=1),
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
    )
    (tmp_path / "old.pem").write_bytes(cert)
    (tmp_path / "old-key.pem").write_bytes(key)

    with pytest.raises(CertificateExpired, match=r"old\.pem expired at .*igw pki issue agent"):
        ClientConfig(["127.0.0.1:1"], tmp_path / "old.pem", tmp_path / "old-key.pem", pki / "ca.pem")


def test_config_from_env_reads_igw_variables_and_arguments_win(pki: Path) -> None:
    env = {
        "IGW_ROUTER_ADDRS": "10.0.0.1:50051, 10.0.0.2:50051",
        "IGW_TLS_CERT": str(pki / "agent-demo-quickstart.pem"),
        "IGW_TLS_KEY": str(pki / "agent-demo-quickstart-key.pem"),
        "IGW_TLS_CA": str(pki / "ca.pem"),
        "IGW_TRUST_DOMAIN": "prod.example",
        "IGW_TIMEOUT": "12.5",
    }
    config = ClientConfig.from_env(env)
    assert config.addresses == ("10.0.0.1:50051", "10.0.0.2:50051")
    # The router is checked by its SPIFFE id in the configured trust domain, never a DNS name.
    assert config.server_id == "spiffe://prod.example/router"
    assert ClientConfig.from_env({**env, "IGW_ROUTER_SPIFFE_ID": "spiffe://x/gw"}).server_id == "spiffe://x/gw"
    assert config.timeout == 12.5
    assert config.max_attempts == 4

    overridden = ClientConfig.from_env(env, addresses=["127.0.0.1:9"], timeout=3)
    assert overridden.addresses == ("127.0.0.1:9",)
    assert overridden.timeout == 3


def test_config_without_an_address_says_which_variable_to_set(pki: Path) -> None:
    with pytest.raises(ClientConfigError, match="IGW_ROUTER_ADDRS"):
        ClientConfig.from_env({"IGW_TLS_CERT": str(pki / "ca.pem")})


def test_message_helpers_build_the_proto_messages() -> None:
    assert user("hi").role == router_pb2.ROLE_USER
    assert system("be brief").parts[0].text == "be brief"
    result = tool_result("call_1", "lookup", {"answer": 42})
    assert result.role == router_pb2.ROLE_TOOL
    assert result.tool_call_id == "call_1"
    assert result.parts[0].text == '{"answer":42}'


# --------------------------------------------------------------------------- against a real gRPC server


# Errors the router chooses after its own attempts: never sent again by the client.
_ROUTER_CHOSEN: dict[str, server_errors.IgwError] = {
    "key_refused": server_errors.FailedPrecondition(
        "PROVIDER_AUTH_FAILED", "model 'fast' has no usable deployment: d: the provider refused the credential",
        {"attempt_1_deployment": "d", "attempt_1_outcome": "AUTH_FAILED", "attempt_1_http_status": 401}),
    "all_failed": server_errors.Unavailable("ALL_CANDIDATES_FAILED", "no deployment could answer",
                                            retry_delay_s=2.5),
    "ledger_down": server_errors.Unavailable("LEDGER_UNAVAILABLE", "the budget ledger could not be reached"),
    "rate_limited": server_errors.ResourceExhausted("UPSTREAM_RATE_LIMITED", "all rate limited", retry_delay_s=4),
}


class _FakeRouter(router_pb2_grpc.RouterServiceServicer):
    """A RouterService whose behaviour each test scripts."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.request_ids: list[str] = []
        self.lock = threading.Lock()

    def _record(self, request: router_pb2.GenerateRequest) -> None:
        with self.lock:
            self.request_ids.append(request.request_id)

    def Generate(self, request: router_pb2.GenerateRequest, context: grpc.ServicerContext) -> Any:
        self._record(request)
        if self.mode == "budget":
            context.abort_with_status(_budget_status())
        if self.mode == "unavailable":
            context.abort_with_status(
                server_errors.to_status(server_errors.Unavailable("DRAINING", "shutting down"), "router.igw")
            )
        if self.mode in _ROUTER_CHOSEN:
            context.abort_with_status(server_errors.to_status(_ROUTER_CHOSEN[self.mode], "router.igw"))
        return router_pb2.GenerateResponse(request_id=request.request_id, text="hello", cost_nanos=1400)

    def GenerateStream(
        self, request: router_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[router_pb2.GenerateStreamResponse]:
        self._record(request)
        if self.mode == "budget":
            context.abort_with_status(_budget_status())
        if self.mode in _ROUTER_CHOSEN:
            context.abort_with_status(server_errors.to_status(_ROUTER_CHOSEN[self.mode], "router.igw"))
        yield router_pb2.GenerateStreamResponse(start=router_pb2.StreamStart(request_id=request.request_id))
        if self.mode == "break_mid_stream":
            context.abort_with_status(
                server_errors.to_status(server_errors.Unavailable("UPSTREAM_BROKE", "broke"), "router.igw")
            )
        yield router_pb2.GenerateStreamResponse(text_delta=router_pb2.TextDelta(text="hel"))
        yield router_pb2.GenerateStreamResponse(text_delta=router_pb2.TextDelta(text="lo"))
        yield router_pb2.GenerateStreamResponse(final=router_pb2.GenerateResponse(request_id=request.request_id))


@pytest.fixture
def start_router(pki: Path) -> Iterator[Any]:
    servers: list[grpc.Server] = []

    def start(mode: str) -> tuple[str, _FakeRouter]:
        fake = _FakeRouter(mode)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        router_pb2_grpc.add_RouterServiceServicer_to_server(fake, server)
        creds = server_credentials(pki / "router.pem", pki / "router-key.pem", pki / "ca.pem")
        port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", fake

    yield start
    for server in servers:
        server.stop(None)


def _config(pki: Path, *addresses: str, attempts: int = 4) -> ClientConfig:
    return ClientConfig(
        list(addresses),
        pki / "agent-demo-quickstart.pem",
        pki / "agent-demo-quickstart-key.pem",
        pki / "ca.pem",
        timeout=10,
        max_attempts=attempts,
    )


def test_generate_over_mtls_raises_budget_exceeded_decoded_from_the_trailer(pki: Path, start_router: Any) -> None:
    address, _ = start_router("budget")
    with IgwClient(_config(pki, address)) as client, pytest.raises(BudgetExceeded) as caught:
        client.generate("fast", "hi")
    assert caught.value.remaining_nanos == 100_000
    assert caught.value.domain == "ledger.igw"


def test_unavailable_is_retried_on_the_next_address_with_the_same_request_id(pki: Path, start_router: Any) -> None:
    down, down_fake = start_router("unavailable")
    up, up_fake = start_router("ok")
    with IgwClient(_config(pki, down, up)) as client:
        for _ in range(3):
            answer = client.generate("fast", "hi")
            assert answer.text == "hello"
    # Every call that hit the draining router was finished by the healthy one with the same id.
    for request_id in down_fake.request_ids:
        assert request_id in up_fake.request_ids
    assert len(set(up_fake.request_ids)) == 3
    assert all(len(r) == 32 for r in up_fake.request_ids)


def test_retries_stop_after_max_attempts_and_raise_unavailable(pki: Path, start_router: Any) -> None:
    down, fake = start_router("unavailable")
    with IgwClient(_config(pki, down, attempts=3)) as client, pytest.raises(Unavailable):
        client.generate("fast", "hi", request_id="fixed-id")
    assert fake.request_ids == ["fixed-id"] * 3


def test_other_errors_are_never_retried(pki: Path, start_router: Any) -> None:
    address, fake = start_router("budget")
    with IgwClient(_config(pki, address)) as client, pytest.raises(BudgetExceeded):
        client.generate("fast", "hi")
    assert len(fake.request_ids) == 1


def test_a_stream_is_iterated_to_its_final_message(pki: Path, start_router: Any) -> None:
    address, _ = start_router("ok")
    with IgwClient(_config(pki, address)) as client:
        events = list(client.stream("fast", "hi"))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["start", "text_delta", "text_delta", "final"]
    assert "".join(e.text_delta.text for e in events) == "hello"


def test_a_stream_that_broke_after_its_first_message_is_not_retried(pki: Path, start_router: Any) -> None:
    address, fake = start_router("break_mid_stream")
    received = []
    with IgwClient(_config(pki, address)) as client, pytest.raises(Unavailable):
        for event in client.stream("fast", "hi"):
            received.append(event)
    assert len(received) == 1
    assert len(fake.request_ids) == 1


def test_a_stream_refused_before_its_first_message_raises_the_typed_error(pki: Path, start_router: Any) -> None:
    address, _ = start_router("budget")
    with IgwClient(_config(pki, address)) as client, pytest.raises(BudgetExceeded):
        list(client.stream("fast", "hi"))


async def test_the_async_client_retries_and_decodes_errors_like_the_sync_one(pki: Path, start_router: Any) -> None:
    down, _ = start_router("unavailable")
    up, _ = start_router("ok")
    budget, _ = start_router("budget")
    async with AsyncIgwClient(_config(pki, down, up)) as client:
        answer = await client.generate("fast", [user("hi")])
        assert answer.text == "hello"
        kinds = [e.WhichOneof("event") async for e in client.stream("fast", "hi")]
        assert kinds[-1] == "final"
    async with AsyncIgwClient(_config(pki, budget)) as client:
        with pytest.raises(BudgetExceeded) as caught:
            await client.generate("fast", "hi")
        assert caught.value.limit_nanos == 5_000_000_000


@pytest.mark.parametrize("mode", sorted(_ROUTER_CHOSEN))
@pytest.mark.parametrize("streamed", [False, True])
def test_an_error_the_router_chose_is_sent_once_with_default_settings(
    pki: Path, start_router: Any, mode: str, streamed: bool
) -> None:
    """A provider that refuses a key, every candidate failing, the ledger down: the router already
    tried (and fell back); the client does not multiply that by its max_attempts."""
    address, fake = start_router(mode)
    config = ClientConfig([address], pki / "agent-demo-quickstart.pem", pki / "agent-demo-quickstart-key.pem",
                          pki / "ca.pem")
    assert config.max_attempts > 1  # the defaults would retry, were it safe
    with IgwClient(config) as client, pytest.raises(IgwError) as caught:
        if streamed:
            list(client.stream("fast", "hi"))
        else:
            client.generate("fast", "hi")
    assert len(fake.request_ids) == 1
    assert not caught.value.retryable
    assert caught.value.reason == _ROUTER_CHOSEN[mode].reason
    assert caught.value.retry_delay == _ROUTER_CHOSEN[mode].retry_delay_s


def test_a_router_that_cannot_be_reached_is_retried_on_the_next_address_with_the_same_id(
    pki: Path, start_router: Any
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    up, fake = start_router("ok")
    with IgwClient(_config(pki, dead, up)) as client:
        for _ in range(3):
            assert client.generate("fast", "hi", request_id="same-id").text == "hello"
    assert fake.request_ids == ["same-id"] * 3


def test_a_rate_limited_status_becomes_rate_limited_with_the_retry_delay_and_retry_info() -> None:
    err = server_errors.ResourceExhausted(
        "RATE_LIMITED", "rate limit reached", {"team": "demo", "requests_per_minute": 10,
                                               "retry_after_seconds": "12.500"}, retry_delay_s=12.5)
    status = server_errors.to_status(err, "ledger.igw")
    rpc = _FakeRpcError(status)
    error = error_from_rpc_error(rpc)
    assert isinstance(error, RateLimited) and isinstance(error, ResourceExhausted)
    assert error.retry_after_seconds == 12.5
    assert server_errors.retry_delay_from_rpc_error(rpc) == 12.5  # the google.rpc.RetryInfo detail
    without = error_from_rpc_error(_FakeRpcError(server_errors.to_status(
        server_errors.ResourceExhausted("RATE_LIMITED", "slow down"), "router.igw")))
    assert isinstance(without, RateLimited) and without.retry_after_seconds is None


def test_a_request_names_its_run_and_cap() -> None:
    req = build_request("fast", "hi", run_id="job-42", run_cap_nanos=2_000_000_000)
    assert (req.run_id, req.run_cap_nanos) == ("job-42", 2_000_000_000)
    plain = build_request("fast", "hi")
    assert (plain.run_id, plain.run_cap_nanos) == ("", 0)
