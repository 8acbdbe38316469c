"""``python -m igw_dev.fakes --kind openai --port 0 [--api-key K] [--delay-ms N] [--port-file P]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from . import KINDS, FaultRule, start_fake

_LOGGER = logging.getLogger(__name__)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m igw_dev.fakes", description="Run a fake LLM provider.")
    p.add_argument("--kind", required=True, choices=[*KINDS, "openai_compatible"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("IGW_FAKE_API_KEY") or None,
                   help="accept only this key (default: $IGW_FAKE_API_KEY, which keeps it out of `ps`; "
                        "else any non-empty key)")
    p.add_argument("--delay-ms", type=int, default=0, help="latency added before every answer")
    p.add_argument("--chunk-delay-ms", type=int, default=0, help="pause between streamed events")
    p.add_argument("--port-file", default=None, help="write the bound port to this file")
    p.add_argument("--fault", action="append", default=[], help="JSON rule or list of rules at startup")
    p.add_argument("--no-uvloop", action="store_true")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    rules: list[FaultRule] = []
    for raw in args.fault:
        decoded = json.loads(raw)
        items = decoded if isinstance(decoded, list) else [decoded]
        rules.extend(FaultRule.from_json(r) for r in items)
    handle = await start_fake(
        args.kind,
        api_key=args.api_key,
        delay_ms=args.delay_ms,
        host=args.host,
        port=args.port,
        chunk_delay_ms=args.chunk_delay_ms,
        faults=rules,
    )
    print(handle.port, flush=True)
    if args.port_file:
        path = Path(args.port_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{handle.port}\n")
        os.replace(tmp, path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await handle.close()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(_main(args))
            return 0
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
