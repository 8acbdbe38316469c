"""`igw`: the operator command line (entry point ``igw = services.cli.main:main``).

Exit codes: 0 ok; 1 a gRPC call failed (one line ``error: <CODE> <reason>: <message>``) or a
check failed (``audit verify``); 2 usage or local setup errors (missing endpoints file or
certificate, expired certificate). `igw probe` has grpc_health_probe's own codes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc

from services.cli import commands_admin, commands_agent, commands_dev, commands_probe, metrics_plot
from services.cli.output import format_error
from services.cli.parsing import CliError, IgwArgumentParser, SubParsers, common_options

__all__ = ["build_parser", "main"]


def build_parser() -> IgwArgumentParser:
    """The full `igw` argument parser."""
    parser = IgwArgumentParser(
        prog="igw",
        description="igw: operate the inference gateway (router, keyvault, ledger).",
        epilog="Run `igw COMMAND --help` for a command's options.",
    )
    sub: SubParsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = common_options()
    commands_dev.register(sub, parent)
    commands_probe.register(sub, parent)
    commands_agent.register(sub, parent)
    commands_admin.register(sub, parent)
    metrics_plot.register(sub, parent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `igw`; returns the exit code (and exits with it when run as a script)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Unknown options surface at the top level; `igw probe` still exits 1 for them.
        parser.error_exit_code = int(getattr(args, "error_exit_code", 2))
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = int(args.func(args) or 0)
    except CliError as err:
        print(f"error: {err.message}", file=sys.stderr)
        code = err.exit_code
    except grpc.RpcError as err:
        print(format_error(err), file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 0
    except Exception as err:
        from igw.client import ClientConfigError, IgwError

        if isinstance(err, ClientConfigError):
            print(f"error: {err.message}", file=sys.stderr)
            code = 2
        elif isinstance(err, IgwError):
            print(format_error(err), file=sys.stderr)
            code = 1
        else:
            raise
    return code


def run() -> None:
    """Console-script style entry: exit with main()'s code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
