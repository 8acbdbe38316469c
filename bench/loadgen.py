"""The load generator: gRPC (igw) and HTTP (direct to the fake, LiteLLM), in its own process.

Run as ``python -m bench.loadgen --serve``: reads one JSON job per line on stdin, answers
one JSON result per line on stdout, and keeps its channels and HTTP sessions warm between
jobs (a job names them by a key). The harness (:mod:`bench.scenarios`) talks to it through
:class:`LoadGen`.

Two load shapes:

* ``closed``: one call at a time, ``n`` calls (pure overhead at one call in flight).
* ``open``: a fixed arrival rate for ``duration`` seconds. Sends are scheduled on a fixed
  timetable (call *i* at ``t0 + i / rate``) whatever the completions, and latency is
  measured from the *scheduled* send time, so a slow gateway cannot hide its queueing
  (no coordinated omission). The service time (from the actual send) and the send lag
  (how late the client itself was; a large lag means the load generator is saturated) are
  reported too.

Job fields (JSON)::

    {"kind": "grpc" | "http", "mode": "closed" | "open", "stream": false,
     "n": 300, "warmup": 20,                       # closed
     "rate": 200, "duration": 10, "warmup_s": 2,  # open
     "timeout": 10, "max_in_flight": 5000, "prompt": "...", "max_tokens": 16,
     # grpc
     "target": "127.0.0.1:P", "ca": "ca.pem", "certs": [["cert.pem", "key.pem"], ...],
     "model": "alias", "rid_prefix": "b123-igw-", "by_provider": false,
     # http (with "certs" and "ca": mTLS, one session per certificate; "rid_header": the
     # header that carries the request id, e.g. igw's x-igw-request-id)
     "url": "http://127.0.0.1:P/v1/chat/completions", "headers": {...}, "model": "fake-small"}

Result fields: ``ok``, ``errors`` {code: count}, ``latency_ms`` / ``service_ms`` /
``ttft_ms`` / ``send_lag_ms`` percentile dicts, ``achieved_rps``, ``offered_rps``,
``sent``, ``failed_ids``, ``samples_ms`` (closed mode and ``keep_samples``), ``warmup``
(counts of the warm-up phase, with its own ``failed_ids``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

PCTS = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9, mean, min, max and n of ``values`` (ms); empty dict when none."""
    if not values:
        return {"n": 0}
    import numpy as np

    arr = np.asarray(values, dtype=float)
    out = {name: round(float(np.percentile(arr, q)), 4) for name, q in PCTS}
    out.update(mean=round(float(arr.mean()), 4), min=round(float(arr.min()), 4),
               max=round(float(arr.max()), 4), n=int(arr.size))
    return out


# --------------------------------------------------------------------------- one call


@dataclass
class _Outcome:
    ok: bool
    code: str = "OK"
    ttft: float | None = None  # seconds from send to the first text
    provider: str = ""


@dataclass
class _Recorder:
    lat: list[float] = field(default_factory=list)  # ms from scheduled send
    svc: list[float] = field(default_factory=list)  # ms from actual send
    ttft: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    failed: list[int] = field(default_factory=list)
    by_provider: dict[str, list[float]] = field(default_factory=dict)
    ok: int = 0
    sent: int = 0
    last_done: float = 0.0


class _GrpcTarget:
    """Warm channels (one per agent certificate) to the router; round-robin per call."""

    def __init__(self, job: dict[str, Any]) -> None:
        import grpc

        from igw.router.v1 import router_pb2, router_pb2_grpc

        self.pb = router_pb2
        ca = open(job["ca"], "rb").read()
        opts = [("grpc.ssl_target_name_override", "localhost"), ("grpc.keepalive_time_ms", 30000),
                ("grpc.max_receive_message_length", 16 << 20)]
        self.channels = []
        self.stubs = []
        for cert, key in job["certs"]:
            creds = grpc.ssl_channel_credentials(ca, open(key, "rb").read(), open(cert, "rb").read())
            ch = grpc.aio.secure_channel(job["target"], creds, options=opts)
            self.channels.append(ch)
            self.stubs.append(router_pb2_grpc.RouterServiceStub(ch))

    async def warm(self) -> None:
        await asyncio.gather(*(ch.channel_ready() for ch in self.channels))

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()

    def caller(self, job: dict[str, Any]) -> Callable[[int, str], Awaitable[_Outcome]]:
        import grpc

        pb = self.pb
        stubs = self.stubs
        nstubs = len(stubs)
        timeout = float(job.get("timeout", 10))
        msg = pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text=job.get("prompt", "hello bench"))])
        template = pb.GenerateRequest(model=job["model"], messages=[msg],
                                      max_output_tokens=int(job.get("max_tokens", 16)))
        stream = bool(job.get("stream"))
        by_provider = bool(job.get("by_provider"))

        async def call(i: int, rid: str) -> _Outcome:
            req = pb.GenerateRequest()
            req.CopyFrom(template)
            req.request_id = rid
            stub = stubs[i % nstubs]
            t0 = time.perf_counter()
            try:
                if not stream:
                    resp = await stub.Generate(req, timeout=timeout)
                    return _Outcome(True, provider=resp.served_by.provider if by_provider else "")
                ttft = None
                final = None
                async for ev in stub.GenerateStream(req, timeout=timeout):
                    kind = ev.WhichOneof("event")
                    if kind == "text_delta" and ttft is None:
                        ttft = time.perf_counter() - t0
                    elif kind == "final":
                        final = ev.final
                if final is None:
                    return _Outcome(False, "NO_FINAL")
                return _Outcome(True, ttft=ttft, provider=final.served_by.provider if by_provider else "")
            except grpc.aio.AioRpcError as err:
                return _Outcome(False, err.code().name)
            except Exception as err:
                return _Outcome(False, type(err).__name__)

        return call


class _HttpTarget:
    """aiohttp sessions (keep-alive pools) to an OpenAI-compatible endpoint: one, or with ``certs``
    (igw's HTTPS edge) one per agent certificate over mTLS, round-robin per call."""

    def __init__(self, job: dict[str, Any]) -> None:
        import ssl

        import aiohttp

        self.aiohttp = aiohttp
        self.sessions = []
        for cert in job.get("certs") or [None]:
            ctx: ssl.SSLContext | None = None
            if cert is not None:
                ctx = ssl.create_default_context(cafile=job["ca"])
                ctx.load_cert_chain(cert[0], cert[1])
            conn = aiohttp.TCPConnector(limit=int(job.get("max_in_flight", 5000)), force_close=False,
                                        enable_cleanup_closed=True, ssl=ctx if ctx is not None else True)
            self.sessions.append(aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)))

    async def warm(self) -> None:
        return None

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()

    def caller(self, job: dict[str, Any]) -> Callable[[int, str], Awaitable[_Outcome]]:
        aiohttp = self.aiohttp
        sessions = self.sessions
        nsessions = len(sessions)
        rid_header = job.get("rid_header")
        url = job["url"]
        stream = bool(job.get("stream"))
        body: dict[str, Any] = {
            "model": job["model"],
            "messages": [{"role": "user", "content": job.get("prompt", "hello bench")}],
            "max_tokens": int(job.get("max_tokens", 16)),
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        payload = json.dumps(body).encode()
        headers = {"content-type": "application/json", **job.get("headers", {})}
        timeout = aiohttp.ClientTimeout(total=float(job.get("timeout", 10)))

        async def call(i: int, rid: str) -> _Outcome:
            t0 = time.perf_counter()
            hdrs = {**headers, rid_header: rid} if rid_header else headers
            try:
                async with sessions[i % nsessions].post(url, data=payload, headers=hdrs, timeout=timeout) as resp:
                    if resp.status != 200:
                        await resp.read()
                        return _Outcome(False, f"HTTP_{resp.status}")
                    if not stream:
                        data = await resp.read()
                        if b'"choices"' not in data:
                            return _Outcome(False, "BAD_BODY")
                        return _Outcome(True)
                    ttft = None
                    done = False
                    async for line in resp.content:
                        if ttft is None and line.startswith(b"data: {") and b'"content":"' in line \
                                and b'"content":""' not in line:
                            ttft = time.perf_counter() - t0
                        elif line.startswith(b"data: [DONE]"):
                            done = True
                    if ttft is None:
                        return _Outcome(False, "NO_TEXT")
                    return _Outcome(True, ttft=ttft) if done else _Outcome(False, "NO_DONE")
            except TimeoutError:
                return _Outcome(False, "TIMEOUT")
            except aiohttp.ClientError as err:
                return _Outcome(False, type(err).__name__)
            except Exception as err:
                return _Outcome(False, type(err).__name__)

        return call


# --------------------------------------------------------------------------- load shapes


async def _closed(call: Callable[[int, str], Awaitable[_Outcome]], n: int, prefix: str,
                  rec: _Recorder) -> None:
    for i in range(n):
        t0 = time.perf_counter()
        out = await call(i, f"{prefix}{i}")
        t1 = time.perf_counter()
        rec.sent += 1
        _record(rec, i, out, t0, t0, t1)


async def _concurrent(call: Callable[[int, str], Awaitable[_Outcome]], conc: int, duration: float, prefix: str,
                      rec: _Recorder) -> float:
    """``conc`` workers, each one call at a time, for ``duration`` s (a throughput ceiling)."""
    t0 = time.perf_counter()
    end = t0 + duration
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.perf_counter() < end:
            i = next(counter)
            s = time.perf_counter()
            out = await call(i, f"{prefix}{i}")
            rec.sent += 1
            _record(rec, i, out, s, s, time.perf_counter())

    await asyncio.gather(*(worker() for _ in range(conc)))
    return t0


def _record(rec: _Recorder, i: int, out: _Outcome, sched: float, sent: float, done: float) -> None:
    rec.last_done = max(rec.last_done, done)
    if out.ok:
        rec.ok += 1
        lat = (done - sched) * 1000
        rec.lat.append(lat)
        rec.svc.append((done - sent) * 1000)
        rec.lag.append((sent - sched) * 1000)
        if out.ttft is not None:
            rec.ttft.append(out.ttft * 1000 + (sent - sched) * 1000)
        if out.provider:
            rec.by_provider.setdefault(out.provider, []).append(lat)
    else:
        rec.errors[out.code] += 1
        rec.failed.append(i)


async def _open(call: Callable[[int, str], Awaitable[_Outcome]], rate: float, duration: float, prefix: str,
                rec: _Recorder, max_in_flight: int, timeout: float) -> float:
    """Fixed-rate arrivals; returns the measured window start (perf_counter)."""
    n = max(1, int(round(rate * duration)))
    interval = 1.0 / rate
    tasks: set[asyncio.Task[None]] = set()
    in_flight = 0

    async def one(i: int, sched: float) -> None:
        nonlocal in_flight
        sent = time.perf_counter()
        try:
            out = await call(i, f"{prefix}{i}")
        finally:
            in_flight -= 1
        _record(rec, i, out, sched, sent, time.perf_counter())

    loop = asyncio.get_running_loop()
    t0 = time.perf_counter() + 0.02
    i = 0
    while i < n:
        due = t0 + i * interval
        delay = due - time.perf_counter()
        if delay > 0.0002:
            await asyncio.sleep(delay)
        now = time.perf_counter()
        while i < n and t0 + i * interval <= now + 0.0002:
            sched = t0 + i * interval
            rec.sent += 1
            if in_flight >= max_in_flight:
                rec.errors["CLIENT_OVERLOAD"] += 1
                rec.failed.append(i)
            else:
                in_flight += 1
                task = loop.create_task(one(i, sched))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            i += 1
    if tasks:
        await asyncio.wait(list(tasks), timeout=timeout + 5)
    return t0


def _summary(rec: _Recorder, *, t0: float | None = None, rate: float | None = None,
             keep: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ok": rec.ok, "sent": rec.sent, "errors": dict(rec.errors), "failed_ids": rec.failed[:10000],
        "latency_ms": percentiles(rec.lat), "service_ms": percentiles(rec.svc),
    }
    if rec.ttft:
        out["ttft_ms"] = percentiles(rec.ttft)
    if rec.by_provider:
        out["by_provider"] = {k: percentiles(v) for k, v in rec.by_provider.items()}
    if t0 is not None and rate is not None:
        span = max(rec.last_done - t0, 1e-9)
        out["offered_rps"] = rate
        out["achieved_rps"] = round(rec.ok / span, 2)
        out["send_lag_ms"] = percentiles(rec.lag)
    if keep:
        out["samples_ms"] = [round(x, 4) for x in rec.lat]
        if rec.ttft:
            out["ttft_samples_ms"] = [round(x, 4) for x in rec.ttft]
    return out


# --------------------------------------------------------------------------- the server loop


class _Worker:
    def __init__(self) -> None:
        self.targets: dict[str, Any] = {}

    async def target(self, job: dict[str, Any]) -> Any:
        key = job.get("key") or json.dumps({k: job.get(k) for k in ("kind", "target", "url", "certs")})
        tgt = self.targets.get(key)
        if tgt is None:
            tgt = _GrpcTarget(job) if job["kind"] == "grpc" else _HttpTarget(job)
            await tgt.warm()
            self.targets[key] = tgt
        return tgt

    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        if job.get("op") == "ping":
            return {"pong": True, "pid": os.getpid()}
        tgt = await self.target(job)
        call = tgt.caller(job)
        prefix = job.get("rid_prefix", f"lg{os.getpid()}-{time.time_ns()}-")
        timeout = float(job.get("timeout", 10))
        if job["mode"] == "closed":
            warm = _Recorder()
            await _closed(call, int(job.get("warmup", 10)), prefix + "w", warm)
            rec = _Recorder()
            await _closed(call, int(job["n"]), prefix, rec)
            res = _summary(rec, keep=bool(job.get("keep_samples", True)))
        elif job["mode"] == "concurrent":
            warm = _Recorder()
            conc = int(job.get("concurrency", 32))
            await _concurrent(call, conc, float(job.get("warmup_s", 0.5)), prefix + "w", warm)
            rec = _Recorder()
            t0 = await _concurrent(call, conc, float(job["duration"]), prefix, rec)
            res = _summary(rec, t0=t0, rate=0.0)
        else:
            rate = float(job["rate"])
            warm = _Recorder()
            wdur = float(job.get("warmup_s", 1.0))
            if wdur > 0:
                await _open(call, rate, wdur, prefix + "w", warm, int(job.get("max_in_flight", 5000)), timeout)
            rec = _Recorder()
            t0 = await _open(call, rate, float(job["duration"]), prefix, rec,
                             int(job.get("max_in_flight", 5000)), timeout)
            res = _summary(rec, t0=t0, rate=rate, keep=bool(job.get("keep_samples", False)))
        res["warmup"] = {"ok": warm.ok, "sent": warm.sent, "errors": dict(warm.errors),
                         "failed_ids": warm.failed[:10000]}
        res["rid_prefix"] = prefix
        return res

    async def close(self) -> None:
        for tgt in self.targets.values():
            try:
                await tgt.close()
            except Exception:
                pass


async def _serve() -> None:
    worker = _Worker()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    while True:
        line = await reader.readline()
        if not line:
            break
        if not line.strip():
            continue
        job = json.loads(line)
        if job.get("op") == "quit":
            break
        try:
            res = await worker.run(job)
        except Exception as err:
            res = {"fatal": f"{type(err).__name__}: {err}"}
        out.write(json.dumps(res) + "\n")
        out.flush()
    await worker.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen")
    p.add_argument("--serve", action="store_true", help="read JSON jobs on stdin, answer on stdout")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)
    if not args.serve:
        p.error("only --serve is supported; use bench.loadgen.LoadGen from Python")
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.run(_serve())
            return 0
        except ImportError:
            pass
    asyncio.run(_serve())
    return 0


# --------------------------------------------------------------------------- harness side


class LoadGen:
    """The harness's handle on a load generator process (``python -m bench.loadgen --serve``)."""

    def __init__(self, python: str = sys.executable, cwd: str | None = None, log_path: str | None = None) -> None:
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [python, "-m", "bench.loadgen", "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._lock = threading.Lock()
        self.pid = self.proc.pid
        self.run({"op": "ping"})

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Runs one job and returns its result (blocks)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited with {self.proc.poll()}")
        res: dict[str, Any] = json.loads(line)
        if "fatal" in res:
            raise RuntimeError(f"load generator: {res['fatal']}")
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


if __name__ == "__main__":
    sys.exit(main())
