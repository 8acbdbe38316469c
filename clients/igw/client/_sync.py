"""The blocking igw client."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from igw.client._config import ClientConfig, Metadata, _metadata
from igw.client._errors import ClientConfigError, IgwError, error_from_rpc_error
from igw.client._identity import Link, decide, native_credentials, native_options, stamps_of
from igw.client._messages import MessagesArg, ToolLike, build_request
from igw.client._retry import AddressRotation, Deadline, backoff_delay, is_retryable
from igw.client._spiffe import TunnelThread
from igw.router.v1 import router_pb2, router_pb2_grpc

__all__ = ["IgwClient"]

_LOGGER = logging.getLogger("igw.client")
T = TypeVar("T")
USER_AGENT = "igw-client/0.1"
# A replaced channel (rotated files, a new identity check) closes after the calls on it had this long.
OLD_CHANNEL_GRACE_S = 30.0


class IgwClient:
    """A blocking client of the igw Router, for agents.

    One long-lived mTLS channel per router address, created on first use; the router's identity
    is checked by gRPC's own TLS when its certificate carries the identity's DNS name, else by the
    SPIFFE tunnel (``identity_check``, :mod:`igw.client._identity`). Every call has a
    deadline; UNAVAILABLE is retried on the next address with backoff, keeping the request
    id; every other failure raises one typed :class:`~igw.client.IgwError`.

    Use as a context manager, or call :meth:`close`::

        with IgwClient.from_env() as client:
            answer = client.generate("fast", "Say hello")
            print(answer.text)
    """

    def __init__(self, config: ClientConfig | None = None, **overrides: Any) -> None:
        """Uses ``config``, or builds one from ``IGW_*`` variables with ``overrides``
        (``addresses``, ``cert``, ``key``, ``ca``, ``server_id``, ``timeout``, ``max_attempts``)."""
        if config is None:
            config = ClientConfig.from_env(**overrides)
        elif overrides:
            raise ClientConfigError("pass either a ClientConfig or keyword settings, not both")
        self._config = config
        self._rotation = AddressRotation(len(config.addresses))
        self._links: dict[int, Link] = {}
        self._retiring: list[threading.Timer] = []
        self._tunnels: TunnelThread | None = None
        self._files = config.tls_files()
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_env(cls, **overrides: Any) -> IgwClient:
        """A client configured from ``IGW_*`` environment variables (``overrides`` win)."""
        return cls(ClientConfig.from_env(**overrides))

    @property
    def config(self) -> ClientConfig:
        """The configuration in use."""
        return self._config

    # ------------------------------------------------------------------ channels

    def _stub(self, index: int, deadline: Deadline) -> router_pb2_grpc.RouterServiceStub:
        return router_pb2_grpc.RouterServiceStub(self._channel(index, deadline))  # type: ignore[no-untyped-call]

    def _channel(self, index: int, deadline: Deadline) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise ClientConfigError("the client is closed", reason="CLIENT_CLOSED")
            link = self._links.get(index)
            if link is None or link.due(self._files):
                link = self._links[index] = self._open(index, link, deadline)
            channel: grpc.Channel = link.channel
            return channel

    def _open(self, index: int, old: Link | None, deadline: Deadline) -> Link:
        """A link to router ``index``: probed once, then gRPC's own TLS or the tunnel (under the lock)."""
        address, server_id = self._config.addresses[index], self._config.server_id
        mode, decided = decide(address, server_id, self._files, self._config.identity_check, deadline.remaining())
        if old is not None and old.mode == mode == "tunnel":
            old.decided, old.doubted = decided, False
            return old  # the tunnel follows rotated files by itself
        options = [*self._config.channel_options(), ("grpc.primary_user_agent", USER_AGENT)]
        if mode == "native":
            creds = native_credentials(self._files)
            channel = grpc.secure_channel(address, creds, [*options, *native_options(server_id)])
        else:
            if self._tunnels is None:
                self._tunnels = TunnelThread()
            # TLS (and the router's SPIFFE id check) happens in the tunnel, on every connection.
            tunnel = self._tunnels.open(address, server_id, self._files)
            channel = grpc.insecure_channel(tunnel.target, [*options, ("grpc.default_authority", address)])
        if old is not None:  # calls on the old channel finish; it closes after a grace
            timer = threading.Timer(OLD_CHANNEL_GRACE_S, old.channel.close)
            timer.daemon = True
            timer.start()
            self._retiring = [*(t for t in self._retiring if t.is_alive()), timer]
        _LOGGER.debug("router %s: identity checked by %s", address, mode)
        return Link(channel, mode, decided, stamps_of(self._files))

    def close(self) -> None:
        """Closes every channel. The client cannot be used afterwards."""
        with self._lock:
            self._closed = True
            links, self._links = list(self._links.values()), {}
            tunnels, self._tunnels = self._tunnels, None
            retiring, self._retiring = self._retiring, []
        for timer in retiring:
            timer.cancel()
            timer.function()
        for link in links:
            link.channel.close()
        if tunnels is not None:
            tunnels.close()

    def __enter__(self) -> IgwClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ retry loop

    def _unary(self, call: Callable[[router_pb2_grpc.RouterServiceStub, float], T], timeout: float | None) -> T:
        deadline = Deadline(timeout if timeout is not None else self._config.timeout)
        index = self._rotation.current()
        for attempt in range(self._config.max_attempts):
            try:
                return call(self._stub(index, deadline), max(deadline.remaining(), 0.001))
            except grpc.RpcError as err:
                error = error_from_rpc_error(err)
            if not self._should_retry(error, attempt, deadline):
                raise error
            index = self._backoff(index, attempt, error)
        raise AssertionError("unreachable")  # pragma: no cover

    def _should_retry(self, error: IgwError, attempt: int, deadline: Deadline) -> bool:
        return (
            is_retryable(error.code, error.reason)
            and attempt + 1 < self._config.max_attempts
            and deadline.allows(0)
        )

    def _backoff(self, index: int, attempt: int, error: IgwError) -> int:
        link = self._links.get(index)
        if link is not None and error.code == grpc.StatusCode.UNAVAILABLE:
            link.doubted = True  # probe it again before its next call (a rotated certificate?)
        next_index = self._rotation.failed(index)
        delay = backoff_delay(attempt)
        _LOGGER.debug(
            "router %s unavailable (%s); retrying on %s in %.2fs",
            self._config.addresses[index],
            error.message,
            self._config.addresses[next_index],
            delay,
        )
        time.sleep(delay)
        return next_index

    # ------------------------------------------------------------------ agent RPCs

    def generate(
        self,
        model: str,
        messages: MessagesArg,
        *,
        system: str | None = None,
        tools: Sequence[ToolLike] | None = None,
        tool_choice: str | None = None,
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | None = None,
        request_id: str | None = None,
        run_id: str | None = None,
        run_cap_nanos: int | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> router_pb2.GenerateResponse:
        """Sends one request to model alias ``model`` and returns the whole answer.

        ``messages`` is a prompt string or a list of messages (see :func:`user`,
        :func:`assistant`, :func:`tool_result`). A request id is generated when none is given
        and reused across retries, so the gateway counts the call once.

        ``metadata`` is sent with the call, e.g. ``[("traceparent", ...)]`` so the gateway's
        spans join the agent's trace.

        Raises:
            BudgetExceeded: the team's budget cannot cover the call.
            IgwError: any other failure, typed by code and reason.
        """
        request = build_request(
            model,
            messages,
            system=system,
            tools=tools,
            tool_choice=tool_choice,
            max_output_tokens=max_output_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            request_id=request_id,
            run_id=run_id,
            run_cap_nanos=run_cap_nanos,
        )
        md = _metadata(metadata)
        response: router_pb2.GenerateResponse = self._unary(
            lambda stub, t: stub.Generate(request, timeout=t, metadata=md), timeout
        )
        return response

    def stream(
        self,
        model: str,
        messages: MessagesArg,
        *,
        system: str | None = None,
        tools: Sequence[ToolLike] | None = None,
        tool_choice: str | None = None,
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | None = None,
        request_id: str | None = None,
        run_id: str | None = None,
        run_cap_nanos: int | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Iterator[router_pb2.GenerateStreamResponse]:
        """Like :meth:`generate`, but yields the answer as it arrives.

        The first message is ``start`` (the deployment committed to), then ``text_delta`` /
        ``tool_call_delta`` pieces, and the last is ``final`` (usage and cost). A stream that
        fails before its first message is retried like a unary call; after it, never.
        Leaving the loop early cancels the call.
        """
        request = build_request(
            model,
            messages,
            system=system,
            tools=tools,
            tool_choice=tool_choice,
            max_output_tokens=max_output_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            request_id=request_id,
            run_id=run_id,
            run_cap_nanos=run_cap_nanos,
        )
        return self._stream(request, timeout, _metadata(metadata))

    def _stream(
        self, request: router_pb2.GenerateRequest, timeout: float | None,
        md: tuple[tuple[str, str], ...] | None = None,
    ) -> Iterator[router_pb2.GenerateStreamResponse]:
        deadline = Deadline(timeout if timeout is not None else self._config.timeout)
        index = self._rotation.current()
        for attempt in range(self._config.max_attempts):
            stub = self._stub(index, deadline)
            call = stub.GenerateStream(request, timeout=max(deadline.remaining(), 0.001), metadata=md)
            yielded = False
            try:
                for message in call:
                    yielded = True
                    yield message
                return
            except grpc.RpcError as err:
                error = error_from_rpc_error(err)
            finally:
                # The consumer left early (or failed): do not keep the upstream call running.
                call.cancel()
            if yielded or not self._should_retry(error, attempt, deadline):
                raise error
            index = self._backoff(index, attempt, error)

    def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> router_pb2.ListModelsResponse:
        """The model aliases the caller's team may use, with prices and capabilities."""
        request = router_pb2.ListModelsRequest()
        md = _metadata(metadata)
        response: router_pb2.ListModelsResponse = self._unary(
            lambda stub, t: stub.ListModels(request, timeout=t, metadata=md), timeout
        )
        return response

    def get_budget(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> router_pb2.GetBudgetResponse:
        """The caller's own team's budgets (and its agent's, if any)."""
        request = router_pb2.GetBudgetRequest()
        md = _metadata(metadata)
        response: router_pb2.GetBudgetResponse = self._unary(
            lambda stub, t: stub.GetBudget(request, timeout=t, metadata=md), timeout
        )
        return response

    def __repr__(self) -> str:
        return f"IgwClient(addresses={list(self._config.addresses)!r})"
