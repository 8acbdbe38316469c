"""Agent-side commands, with the agent certificate: `igw chat`, `igw models`."""

from __future__ import annotations

import argparse
import sys

from igw.client import ClientConfig, IgwClient
from igw.router.v1 import router_pb2
from services.cli.output import format_duration, print_json, print_table
from services.cli.parsing import CliError, SubParsers, nanos_to_dollars
from services.cli.session import Session

__all__ = ["register"]


def register(sub: SubParsers, parent: argparse.ArgumentParser) -> None:
    """Adds `chat` and `models`."""
    chat = sub.add_parser("chat", parents=[parent], help="send one prompt (agent certificate), stream the answer")
    chat.add_argument("prompt", nargs="+", help="the prompt ('-' reads it from stdin)")
    chat.add_argument("--model", help="model alias (default: the first alias `igw models` lists)")
    chat.add_argument("--system", help="system instructions")
    chat.add_argument("--max-tokens", type=int, help="most output tokens")
    chat.add_argument("--temperature", type=float, help="sampling temperature, 0 to 2")
    chat.add_argument("--request-id", help="idempotency key (default: a fresh uuid)")
    chat.add_argument("--no-stream", action="store_true", help="use the unary Generate call")
    chat.set_defaults(func=cmd_chat, timeout=120.0)

    models = sub.add_parser("models", parents=[parent], help="model aliases your team may use (agent certificate)")
    models.set_defaults(func=cmd_models)


def _client(session: Session) -> IgwClient:
    files = session.tls("agent")
    address = getattr(session.args, "address", None)
    addresses = [address] if address else session.endpoints().addresses("router")
    config = ClientConfig(
        addresses=addresses,
        cert=files.cert,
        key=files.key,
        ca=files.ca,
        server_id=session.server_id("router"),
        timeout=session.timeout,
    )
    return IgwClient(config)


def _summary(final: router_pb2.GenerateResponse) -> str:
    served = final.served_by
    usage = final.usage
    attempts = len(final.attempts)
    fallbacks = [
        f"{a.deployment}:{router_pb2.AttemptOutcome.Name(a.outcome).removeprefix('ATTEMPT_OUTCOME_').lower()}"
        for a in final.attempts[:-1]
    ]
    parts = [
        f"served by {served.deployment or '?'} ({served.provider}/{served.provider_model})",
        f"tokens {usage.input_tokens} in / {usage.output_tokens} out"
        + (f" ({usage.cached_input_tokens} cached)" if usage.cached_input_tokens else "")
        + (" (estimated)" if usage.estimated else ""),
        f"cost {nanos_to_dollars(final.cost_nanos)}",
        f"attempts {attempts}" + (f" (fell back from {', '.join(fallbacks)})" if fallbacks else ""),
    ]
    if final.HasField("latency"):
        parts.append(f"latency {format_duration(final.latency)}")
    parts.append(f"request {final.request_id}")
    return " · ".join(parts)


def _default_model(client: IgwClient) -> str:
    models = client.list_models().models
    if not models:
        raise CliError("no model alias is available to this agent's team (see `igw config show`)")
    return str(models[0].alias)


def cmd_chat(args: argparse.Namespace) -> int:
    """`igw chat [--model M] PROMPT`: streams the answer to stdout, a summary to stderr."""
    prompt = " ".join(args.prompt)
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise CliError("the prompt is empty")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise CliError("--max-tokens must be at least 1")
    session = Session(args)
    with _client(session) as client:
        model = args.model or _default_model(client)
        kwargs = {
            "system": args.system,
            "max_output_tokens": args.max_tokens,
            "temperature": args.temperature,
            "request_id": args.request_id,
        }
        if args.json or args.no_stream:
            final = client.generate(model, prompt, **kwargs)  # type: ignore[arg-type]
            if args.json:
                print_json(final)
                return 0
            print(final.text)
        else:
            final = router_pb2.GenerateResponse()
            ended_with_newline = True
            for event in client.stream(model, prompt, **kwargs):  # type: ignore[arg-type]
                kind = event.WhichOneof("event")
                if kind == "text_delta":
                    text = event.text_delta.text
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    if text:
                        ended_with_newline = text.endswith("\n")
                elif kind == "final":
                    final = event.final
            if not ended_with_newline:
                sys.stdout.write("\n")
            sys.stdout.flush()
        for call in final.tool_calls:
            print(f"[tool call {call.id}] {call.name}({call.arguments_json})")
        print(_summary(final), file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """`igw models`: the aliases, their strategy and deployments with prices."""
    session = Session(args)
    with _client(session) as client:
        response = client.list_models()
    if args.json:
        print_json(response)
        return 0
    rows = []
    for model in response.models:
        for i, cand in enumerate(model.candidates or [router_pb2.ModelCandidate()]):
            price = cand.price if cand.HasField("price") else None
            rows.append(
                (
                    model.alias if i == 0 else "",
                    model.strategy if i == 0 else "",
                    cand.deployment,
                    f"{cand.provider}/{cand.provider_model}" if cand.provider else "",
                    nanos_to_dollars(price.input_per_mtok_nanos) if price else "-",
                    nanos_to_dollars(price.output_per_mtok_nanos) if price else "-",
                    f"{cand.context_window:,}" if cand.context_window else "-",
                    ",".join(
                        f
                        for f, on in (
                            ("tools", cand.supports_tools),
                            ("images", cand.supports_images),
                            ("stream", cand.supports_streaming),
                        )
                        if on
                    ),
                )
            )
    print_table(
        ["alias", "strategy", "deployment", "provider/model", "in $/Mtok", "out $/Mtok", "context", "features"],
        rows,
        empty="no model aliases available",
    )
    return 0
