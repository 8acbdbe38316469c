"""Fake LLM providers: real HTTP servers speaking OpenAI, Anthropic and Gemini wire formats.

Deterministic behaviour (so tests can verify translation exactly):

* Reply text: ``"echo: " + <last user text>[:40]``; if the last message is a
  tool result: ``"tool said: " + <result text>[:40]``.
* If the request has tools and the last user text contains "weather", the
  answer is a call of the *first* tool with arguments ``{"city": "Paris"}``
  (streamed as several fragments). The Anthropic fake puts a text block
  ``"Let me check."`` before the ``tool_use`` block, like the real API.
* Tokens: input = number of whitespace-separated words in all message texts
  (system included); cached input = input minus the words of the last
  message (a "prefix cache"); output = words of the reply text plus words of
  the tool-call arguments JSON. If output would exceed the request's max
  tokens, the reply is cut to that many words and finishes with "length".

Fault injection via ``POST /_fake/faults`` (a JSON list of rules, replacing
the current ones; ``DELETE`` clears). A rule::

    {"match_model": "*", "status": 429, "retry_after": 2, "times": 1,
     "probability": 1.0, "delay_ms": 0, "mode": "error",
     "error_type": null, "message": null, "location": null,
     "interval_ms": null, "match_stream": null}

Modes: error, malformed_json, truncated_stream, slow_drip, endless, hang,
redirect, stream_error, echo_key_error, no_usage (normal answer without
usage), ok (normal answer after ``delay_ms``).

Other endpoints: ``GET/DELETE /_fake/requests`` (last 1000 requests),
``GET /_fake/stats`` (includes ``cancelled_streams``: streams whose client
went away early), ``GET /healthz``.

The Gemini fake checks function declarations as the API does: ``parametersJsonSchema``
(full JSON Schema, must describe an object) and ``parameters`` (the OpenAPI subset,
refusing JSON-Schema-only keywords such as ``$ref``, ``$defs``, ``additionalProperties``)
are mutually exclusive; a violation is a 400 INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from aiohttp import web

from .common import _DEFAULT_REDIRECT, KINDS, STATE_KEY, FakeState, FaultRule, _dumps
from .conversation import _Conv, _conv_anthropic, _conv_gemini, _conv_openai, _plan, gemini_tools_error
from .wire_anthropic import _AnthropicWire
from .wire_gemini import _GeminiWire
from .wire_openai import _OpenAIWire, _Wire

# --------------------------------------------------------------------------- handlers


class _Provider:
    """The request handler of one fake provider."""

    def __init__(self, state: FakeState) -> None:
        self.state = state
        kind = state.kind
        self.wire: _Wire = {
            "openai": _OpenAIWire,
            "anthropic": _AnthropicWire,
            "gemini": _GeminiWire,
        }[kind](state)

    # -- helpers
    def _key(self, request: web.Request) -> str:
        kind = self.state.kind
        if kind == "openai":
            auth = request.headers.get("authorization", "")
            return auth[7:] if auth[:7].lower() == "bearer " else ""
        if kind == "anthropic":
            key = request.headers.get("x-api-key", "")
            if not key:
                auth = request.headers.get("authorization", "")
                key = auth[7:] if auth[:7].lower() == "bearer " else ""
            return key
        return request.headers.get("x-goog-api-key", "") or request.query.get("key", "")

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
        self.state.by_status[str(status)] = self.state.by_status.get(str(status), 0) + 1
        return web.Response(
            status=status, body=_dumps(body), content_type="application/json", headers=headers
        )

    def _error(self, rule: FaultRule | None, status: int, key: str = "", echo: bool = False) -> web.Response:
        message = rule.message if rule else None
        if echo:
            message = f"Incorrect API key provided: {key}."
        body, headers = self.wire.error_body(
            status, rule.error_type if rule else None, message, rule.retry_after if rule else None
        )
        return self._json(status, body, headers)

    # -- entry points
    async def openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, None, None)

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, None, None)

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        model, sep, method = tail.rpartition(":")
        if not sep or method not in ("generateContent", "streamGenerateContent"):
            return self._json(404, {"error": {"code": 404, "message": "Not found", "status": "NOT_FOUND"}})
        return await self._handle(request, model, method == "streamGenerateContent")

    async def _handle(
        self, request: web.Request, model: str | None, gstream: bool | None
    ) -> web.StreamResponse:
        state = self.state
        state.bump("requests")
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            body = None
        state.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "raw_path": request.raw_path,
                "query": dict(request.query),
                "query_string": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
            }
        )
        key = self._key(request)
        if (state.api_key is not None and key != state.api_key) or not key:
            state.bump("auth_failures")
            status, err = self.wire.auth_error(key)
            return self._json(status, err)
        if body is None:
            return self._error(None, 400)
        if state.kind == "openai":
            conv = _conv_openai(body)
        elif state.kind == "anthropic":
            conv = _conv_anthropic(body)
        else:
            problem = gemini_tools_error(body)
            if problem is not None:
                body_, _ = self.wire.error_body(400, "INVALID_ARGUMENT", problem, None)
                return self._json(400, body_)
            conv = _conv_gemini(body, model or "", bool(gstream))
        sse = conv.stream and (state.kind != "gemini" or request.query.get("alt") == "sse")
        if conv.stream:
            state.bump("streams")
        rule = state.pick_fault(conv.model, conv.stream) if state.rules else None
        try:
            delay = state.delay_ms + (rule.delay_ms if rule else 0)
            if delay > 0:
                await asyncio.sleep(delay / 1000.0)
            return await self._respond(request, conv, rule, key, sse)
        except (asyncio.CancelledError, ConnectionResetError):
            state.bump("cancelled_requests")
            if conv.stream:
                state.bump("cancelled_streams")
            raise

    async def _respond(
        self, request: web.Request, conv: _Conv, rule: FaultRule | None, key: str, sse: bool
    ) -> web.StreamResponse:
        state = self.state
        mode = rule.mode if rule else "ok"
        response_id = f"fake-{state.kind}-{state.stats.get('requests', 0)}"
        if mode == "error" and rule is not None:
            return self._error(rule, rule.status or 500)
        if mode == "echo_key_error":
            return self._error(rule, (rule.status if rule else None) or 401, key, echo=True)
        if mode == "redirect":
            location = (rule.location if rule else None) or _DEFAULT_REDIRECT
            status = (rule.status if rule else None) or 307
            state.by_status[str(status)] = state.by_status.get(str(status), 0) + 1
            return web.Response(status=status, headers={"location": location})
        if mode == "hang":
            await asyncio.sleep(3600)
            return self._error(rule, 504)
        plan = _plan(conv, state.kind)
        usage = mode != "no_usage"
        interval = ((rule.interval_ms if rule and rule.interval_ms is not None else None) or 0) / 1000.0
        if not conv.stream:
            headers = self.wire.ok_headers(response_id)
            if mode == "malformed_json":
                return self._raw(200, b'{"id": "x", "choices": [{"index": 0, "message": {', headers)
            if mode == "truncated_stream":
                full = _dumps(self.wire.unary(conv, plan, response_id, usage))
                return self._raw(200, full[: len(full) // 2], headers)
            if mode in ("slow_drip", "endless"):
                return await self._dribble(
                    request, headers, interval or (1.0 if mode == "slow_drip" else 0.01)
                )
            if mode == "stream_error":
                return self._error(rule, (rule.status if rule else None) or 503)
            return self._json(200, self.wire.unary(conv, plan, response_id, usage), headers)
        # streaming
        if not sse:  # Gemini streamGenerateContent without alt=sse: a JSON array
            return self._json(
                200, [json.loads(e[6:]) for e in self.wire.stream_events(conv, plan, response_id, usage)]
            )
        resp = web.StreamResponse(status=200, headers={**self.wire.sse_headers, **self.wire.ok_headers(response_id)})
        state.by_status["200"] = state.by_status.get("200", 0) + 1
        await resp.prepare(request)
        wire = self.wire
        if mode == "malformed_json":
            events = wire.stream_events(conv, plan, response_id, usage)
            await resp.write(events[0] + b'data: {"id": "x", "choices": [\n\n' + b"".join(events[1:]))
        elif mode == "truncated_stream":
            events = wire.stream_events(conv, plan, response_id, usage)
            await resp.write(b"".join(events[: max(1, len(events) // 2)]))
        elif mode == "stream_error":
            prefix = wire.stream_prefix(conv, response_id)
            await resp.write(
                b"".join(prefix)
                + wire.text_event(conv, response_id, "partial ")
                + wire.stream_error_event(
                    (rule.status if rule else None) or (529 if state.kind == "anthropic" else 503),
                    rule.error_type if rule else None,
                    rule.message if rule else None,
                )
            )
        elif mode == "slow_drip":
            await resp.write(b"".join(wire.stream_prefix(conv, response_id)) or b": start\n\n")
            step = interval or 1.0
            while True:
                await asyncio.sleep(step)
                await resp.write(b":")
        elif mode == "endless":
            for b in wire.stream_prefix(conv, response_id):
                await resp.write(b)
            step = interval or 0.01
            event = wire.text_event(conv, response_id, "more ")
            while True:
                await resp.write(event)
                await asyncio.sleep(step)
        else:
            events = wire.stream_events(conv, plan, response_id, usage)
            chunk_delay = state.chunk_delay_ms / 1000.0
            if chunk_delay > 0:
                for ev in events:
                    await resp.write(ev)
                    await asyncio.sleep(chunk_delay)
            else:
                await resp.write(b"".join(events))
        await resp.write_eof()
        state.bump("completed_streams")
        return resp

    def _raw(self, status: int, body: bytes, headers: dict[str, str]) -> web.Response:
        self.state.by_status[str(status)] = self.state.by_status.get(str(status), 0) + 1
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)

    async def _dribble(
        self, request: web.Request, headers: dict[str, str], step: float
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={**headers, "content-type": "application/json"})
        await resp.prepare(request)
        await resp.write(b"{")
        while True:
            await asyncio.sleep(step)
            await resp.write(b" ")


# --------------------------------------------------------------------------- control API


def _control_routes(state: FakeState) -> list[web.RouteDef]:
    async def set_faults(request: web.Request) -> web.Response:
        try:
            raw = await request.json()
            items = raw if isinstance(raw, list) else [raw]
            rules = [FaultRule.from_json(r) for r in items]
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        state.rules = rules
        return web.json_response({"rules": [asdict(r) for r in rules]})

    async def get_faults(request: web.Request) -> web.Response:
        return web.json_response({"rules": [asdict(r) for r in state.rules]})

    async def clear_faults(request: web.Request) -> web.Response:
        state.rules = []
        return web.json_response({"rules": []})

    async def get_requests(request: web.Request) -> web.Response:
        return web.json_response(list(state.requests))

    async def clear_requests(request: web.Request) -> web.Response:
        state.requests.clear()
        return web.json_response([])

    async def stats(request: web.Request) -> web.Response:
        out: dict[str, Any] = {
            k: state.stats.get(k, 0)
            for k in (
                "requests",
                "streams",
                "completed_streams",
                "cancelled_streams",
                "cancelled_requests",
                "faults_applied",
                "auth_failures",
            )
        }
        out.update({k: v for k, v in state.stats.items() if k not in out})
        out["by_status"] = dict(state.by_status)
        out["kind"] = state.kind
        return web.json_response(out)

    async def reset_stats(request: web.Request) -> web.Response:
        state.stats.clear()
        state.by_status.clear()
        return web.json_response({})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "kind": state.kind})

    return [
        web.post("/_fake/faults", set_faults),
        web.get("/_fake/faults", get_faults),
        web.delete("/_fake/faults", clear_faults),
        web.get("/_fake/requests", get_requests),
        web.delete("/_fake/requests", clear_requests),
        web.get("/_fake/stats", stats),
        web.delete("/_fake/stats", reset_stats),
        web.get("/healthz", healthz),
    ]


def build_app(
    kind: str,
    *,
    api_key: str | None = None,
    delay_ms: int = 0,
    chunk_delay_ms: int = 0,
    faults: Iterable[FaultRule] = (),
) -> web.Application:
    """Build the aiohttp application of a fake provider (``openai_compatible`` = ``openai``)."""
    if kind == "openai_compatible":
        kind = "openai"
    if kind not in KINDS:
        raise ValueError(f"unknown fake kind {kind!r}")
    state = FakeState(kind=kind, api_key=api_key, delay_ms=delay_ms, chunk_delay_ms=chunk_delay_ms)
    state.rules = list(faults)
    provider = _Provider(state)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    routes = _control_routes(state)
    if kind == "openai":
        routes.append(web.post("/v1/chat/completions", provider.openai))
    elif kind == "anthropic":
        routes.append(web.post("/v1/messages", provider.anthropic))
    else:
        routes.append(web.post("/v1beta/models/{tail}", provider.gemini))
    app.add_routes(routes)
    return app
