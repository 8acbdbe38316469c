"""The asyncio igw client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from igw.client._config import ClientConfig, Metadata, _metadata
from igw.client._errors import ClientConfigError, IgwError, error_from_rpc_error
from igw.client._identity import Link, decide, native_credentials, native_options, stamps_of
from igw.client._messages import MessagesArg, ToolLike, build_request
from igw.client._retry import AddressRotation, Deadline, backoff_delay, is_retryable
from igw.client._spiffe import SpiffeTunnel
from igw.client._sync import OLD_CHANNEL_GRACE_S, USER_AGENT
from igw.router.v1 import router_pb2, router_pb2_grpc

__all__ = ["AsyncIgwClient"]

_LOGGER = logging.getLogger("igw.client")
T = TypeVar("T")


class AsyncIgwClient:
    """An asyncio client of the igw Router, for agents (same behaviour as :class:`IgwClient`).

    Channels are created on first use, inside the running event loop; use one client per loop::

        async with AsyncIgwClient.from_env() as client:
            async for event in client.stream("fast", "Tell me a story"):
                if event.HasField("text_delta"):
                    print(event.text_delta.text, end="")
    """

    def __init__(self, config: ClientConfig | None = None, **overrides: Any) -> None:
        """Uses ``config``, or builds one from ``IGW_*`` variables with ``overrides``."""
        if config is None:
            config = ClientConfig.from_env(**overrides)
        elif overrides:
            raise ClientConfigError("pass either a ClientConfig or keyword settings, not both")
        self._config = config
        self._rotation = AddressRotation(len(config.addresses))
        self._links: dict[int, Link] = {}
        self._opening: dict[int, asyncio.Lock] = {}
        self._tunnels: list[SpiffeTunnel] = []
        self._starting: set[asyncio.Task[None]] = set()  # tunnel starts and retiring channels
        self._old: list[grpc.aio.Channel] = []
        self._files = config.tls_files()
        self._closed = False

    @classmethod
    def from_env(cls, **overrides: Any) -> AsyncIgwClient:
        """A client configured from ``IGW_*`` environment variables (``overrides`` win)."""
        return cls(ClientConfig.from_env(**overrides))

    @property
    def config(self) -> ClientConfig:
        """The configuration in use."""
        return self._config

    # ------------------------------------------------------------------ channels

    async def _stub(self, index: int, deadline: Deadline) -> router_pb2_grpc.RouterServiceStub:
        if self._closed:
            raise ClientConfigError("the client is closed", reason="CLIENT_CLOSED")
        link = self._links.get(index)
        if link is None or link.due(self._files):
            link = await self._open(index, link, deadline)
        return router_pb2_grpc.RouterServiceStub(link.channel)  # type: ignore[no-untyped-call]

    async def _open(self, index: int, old: Link | None, deadline: Deadline) -> Link:
        """A link to router ``index``: probed once (in a thread), then gRPC's own TLS or the tunnel."""
        async with self._opening.setdefault(index, asyncio.Lock()):
            current = self._links.get(index)
            if current is not None and current is not old:
                return current  # another call opened it meanwhile
            address, server_id = self._config.addresses[index], self._config.server_id
            mode, decided = await asyncio.to_thread(decide, address, server_id, self._files,
                                                    self._config.identity_check, deadline.remaining())
            if self._closed:
                raise ClientConfigError("the client is closed", reason="CLIENT_CLOSED")
            if old is not None and old.mode == mode == "tunnel":
                old.decided, old.doubted = decided, False
                return old  # the tunnel follows rotated files by itself
            link = self._links[index] = Link(self._new_channel(address, mode), mode, decided, stamps_of(self._files))
            if old is not None:  # calls on the old channel finish; it closes after a grace
                self._old.append(old.channel)
                self._background(old.channel.close(OLD_CHANNEL_GRACE_S))
            _LOGGER.debug("router %s: identity checked by %s", address, mode)
            return link

    def _new_channel(self, address: str, mode: str) -> grpc.aio.Channel:
        options = [*self._config.channel_options(), ("grpc.primary_user_agent", USER_AGENT)]
        server_id = self._config.server_id
        if mode == "native":
            creds = native_credentials(self._files)
            return grpc.aio.secure_channel(address, creds, [*options, *native_options(server_id)])
        # TLS (and the router's SPIFFE id check) happens in the tunnel, on every connection;
        # its socket listens already, so the channel may dial before the tunnel task runs.
        tunnel = SpiffeTunnel(address, server_id, self._files)
        self._tunnels.append(tunnel)
        self._background(tunnel.start())
        return grpc.aio.insecure_channel(tunnel.target, [*options, ("grpc.default_authority", address)])

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def close(self, grace: float | None = None) -> None:
        """Closes every channel (waiting up to ``grace`` seconds for calls in flight)."""
        self._closed = True
        links, self._links = list(self._links.values()), {}
        old, self._old = self._old, []
        for channel in [*old, *(link.channel for link in links)]:
            await channel.close(grace)
        for task in list(self._starting):
            task.cancel()
        tunnels, self._tunnels = self._tunnels, []
        for tunnel in tunnels:
            await tunnel.close()

    async def __aenter__(self) -> AsyncIgwClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ retry loop

    async def _unary(
        self,
        call: Callable[[router_pb2_grpc.RouterServiceStub, float], Awaitable[T]],
        timeout: float | None,
    ) -> T:
        deadline = Deadline(timeout if timeout is not None else self._config.timeout)
        index = self._rotation.current()
        for attempt in range(self._config.max_attempts):
            try:
                return await call(await self._stub(index, deadline), max(deadline.remaining(), 0.001))
            except grpc.RpcError as err:
                error = error_from_rpc_error(err)
            if not self._should_retry(error, attempt, deadline):
                raise error
            index = await self._backoff(index, attempt, error)
        raise AssertionError("unreachable")  # pragma: no cover

    def _should_retry(self, error: IgwError, attempt: int, deadline: Deadline) -> bool:
        return (
            is_retryable(error.code, error.reason)
            and attempt + 1 < self._config.max_attempts
            and deadline.allows(0)
        )

    async def _backoff(self, index: int, attempt: int, error: IgwError) -> int:
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
        await asyncio.sleep(delay)
        return next_index

    # ------------------------------------------------------------------ agent RPCs

    async def generate(
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

        See :meth:`igw.client.IgwClient.generate`.
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
        response: router_pb2.GenerateResponse = await self._unary(
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
    ) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        """Yields the answer as it arrives (``async for``); see :meth:`igw.client.IgwClient.stream`."""
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

    async def _stream(
        self, request: router_pb2.GenerateRequest, timeout: float | None,
        md: tuple[tuple[str, str], ...] | None = None,
    ) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        deadline = Deadline(timeout if timeout is not None else self._config.timeout)
        index = self._rotation.current()
        for attempt in range(self._config.max_attempts):
            stub = await self._stub(index, deadline)
            call = stub.GenerateStream(request, timeout=max(deadline.remaining(), 0.001), metadata=md)
            yielded = False
            try:
                async for message in call:
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
            index = await self._backoff(index, attempt, error)

    async def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> router_pb2.ListModelsResponse:
        """The model aliases the caller's team may use, with prices and capabilities."""
        request = router_pb2.ListModelsRequest()
        md = _metadata(metadata)
        response: router_pb2.ListModelsResponse = await self._unary(
            lambda stub, t: stub.ListModels(request, timeout=t, metadata=md), timeout
        )
        return response

    async def get_budget(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> router_pb2.GetBudgetResponse:
        """The caller's own team's budgets (and its agent's, if any)."""
        request = router_pb2.GetBudgetRequest()
        md = _metadata(metadata)
        response: router_pb2.GetBudgetResponse = await self._unary(
            lambda stub, t: stub.GetBudget(request, timeout=t, metadata=md), timeout
        )
        return response

    def __repr__(self) -> str:
        return f"AsyncIgwClient(addresses={list(self._config.addresses)!r})"
