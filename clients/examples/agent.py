"""A small igw agent: send a prompt, stream the answer, handle an exhausted budget.

Configure with the IGW_* variables (or `igw up`'s endpoints file, see clients/README.md):

    IGW_ROUTER_ADDRS=127.0.0.1:50051 IGW_TLS_CERT=agent.pem IGW_TLS_KEY=agent-key.pem \
    IGW_TLS_CA=ca.pem python clients/examples/agent.py --model fast "Write a haiku about gateways"
"""

from __future__ import annotations

import argparse
import sys

from igw.client import BudgetExceeded, ClientConfigError, IgwClient, IgwError, format_nanos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="+")
    parser.add_argument("--model", default="fast", help="model alias (default: fast)")
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args()

    try:
        client = IgwClient.from_env()
    except ClientConfigError as err:  # a missing file, an expired certificate, no address
        print(f"configuration: {err.message}", file=sys.stderr)
        return 2

    with client:
        try:
            for event in client.stream(args.model, " ".join(args.prompt), max_output_tokens=args.max_tokens):
                kind = event.WhichOneof("event")
                if kind == "start":
                    print(f"[{event.start.served_by.deployment}]", file=sys.stderr)
                elif kind == "text_delta":
                    print(event.text_delta.text, end="", flush=True)
                elif kind == "final":
                    usage = event.final.usage
                    print(
                        f"\n[{usage.input_tokens} in / {usage.output_tokens} out tokens, "
                        f"{format_nanos(event.final.cost_nanos)}]",
                        file=sys.stderr,
                    )
        except BudgetExceeded as err:
            remaining = format_nanos(err.remaining_nanos) if err.remaining_nanos is not None else "unknown"
            print(f"budget exhausted: {remaining} left of this window's budget; try later", file=sys.stderr)
            return 1
        except IgwError as err:  # typed by code and reason; err.metadata holds the details
            print(f"igw error {err.code_name} {err.reason}: {err.message}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
