"""The `igw` command line parses money, durations and times exactly, validates its arguments,
and fails with one clear line (exit 2) when its setup is missing."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from concurrent import futures
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from igw.client import error_from_rpc_error
from igw_dev import pki as pki_mod
from services.cli import commands_admin
from services.cli.main import main
from services.cli.output import format_error, with_dollars
from services.cli.parsing import dollars_to_nanos, nanos_to_dollars, parse_duration, parse_time
from services.cli.session import load_endpoints
from services.common import errors as server_errors

# --------------------------------------------------------------------------- money


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("1", 1_000_000_000),
        ("1.50", 1_500_000_000),
        ("$25", 25_000_000_000),
        ("0.000000001", 1),
        ("0.1", 100_000_000),
        ("1_000.25", 1_000_250_000_000),
        ("0", 0),
    ],
)
def test_dollars_convert_to_exact_nanos(text: str, nanos: int) -> None:
    assert dollars_to_nanos(text) == nanos


@pytest.mark.parametrize("text", ["-1", "abc", "", "nan", "inf", "0.0000000001", "1e-10", "$"])
def test_amounts_that_are_negative_not_numbers_or_finer_than_a_nano_dollar_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        dollars_to_nanos(text)


def test_decimal_arithmetic_has_no_float_drift() -> None:
    # 0.1 + 0.2 is 0.30000000000000004 in float; in nano-dollars it is exact.
    assert dollars_to_nanos("0.1") + dollars_to_nanos("0.2") == dollars_to_nanos("0.3")


@given(st.integers(min_value=0, max_value=10**18))
def test_nanos_to_dollars_and_back_is_the_identity(nanos: int) -> None:
    assert dollars_to_nanos(nanos_to_dollars(nanos)) == nanos


def test_nanos_are_shown_with_at_least_cents_and_no_trailing_zeros() -> None:
    assert nanos_to_dollars(5_000_000_000) == "$5.00"
    assert nanos_to_dollars(88_400) == "$0.0000884"
    assert nanos_to_dollars(-1_500_000_000) == "-$1.50"
    assert nanos_to_dollars(1_234_567_890, places=2) == "$1.23"


def test_json_output_adds_dollar_strings_next_to_nano_fields() -> None:
    data = with_dollars({"cost_nanos": "1500000000", "usage": {"input_tokens": "3"}, "rows": [{"limit_nanos": 1}]})
    assert data["cost_usd"] == "1.50"
    assert data["rows"][0]["limit_usd"] == "0.000000001"
    assert data["usage"] == {"input_tokens": "3"}


# --------------------------------------------------------------------------- durations and times


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90d", dt.timedelta(days=90)),
        ("1h", dt.timedelta(hours=1)),
        ("1h30m", dt.timedelta(minutes=90)),
        ("45s", dt.timedelta(seconds=45)),
        ("2w", dt.timedelta(weeks=2)),
        ("3600", dt.timedelta(hours=1)),
        ("250ms", dt.timedelta(milliseconds=250)),
    ],
)
def test_durations_are_parsed(text: str, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "0s", "1x", "h", "1h 2", "-1h", "d90"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_times_are_dates_iso_times_or_durations_ago() -> None:
    now = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
    assert parse_time("2026-11-01", now=now) == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    assert parse_time("2026-11-01T06:30:00Z", now=now) == dt.datetime(2026, 11, 1, 6, 30, tzinfo=dt.UTC)
    assert parse_time("24h", now=now) == dt.datetime(2026, 11, 19, 12, 0, tzinfo=dt.UTC)
    assert parse_time("7d", now=now) == dt.datetime(2026, 11, 13, 12, 0, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="not a time"):
        parse_time("yesterday-ish", now=now)


# --------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    "argv",
    [
        ["budgets", "set", "--team", "a", "--window", "daily", "--limit", "1.0000000001"],
        ["budgets", "set", "--team", "a", "--window", "hourly", "--limit", "1"],
        ["budgets", "set", "--team", "a", "--window", "daily", "--limit", "-5"],
        ["keys", "create", "k", "--provider", "p", "--base-url", "https://x", "--all-teams", "--team", "t"],
        ["keys", "create", "k", "--provider", "p", "--base-url", "https://x"],
        ["keys", "create", "k", "--provider", "p", "--base-url", "https://x", "--all-teams", "--secret", "s"],
        ["keys", "create", "k", "--provider", "p", "--base-url", "https://x", "--all-teams", "--rotate-every", "1x"],
        ["keys", "rotate", "k", "--secret-env", "A", "--secret-file", "f"],
        ["spend", "--by", "team,colour"],
        ["spend", "--since", "last tuesday"],
        ["audit", "list", "--action", "explode"],
        ["prices", "set", "m", "--input", "abc", "--output", "1"],
        ["frobnicate"],
    ],
)
def test_invalid_arguments_exit_2_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_secret_is_never_accepted_as_a_plain_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["keys", "create", "k", "--provider", "p", "--base-url", "https://x", "--all-teams", "sk-live-123"])
    assert "sk-live-123" in capsys.readouterr().err  # argparse names the stray argument; it was not used


def test_the_secret_comes_from_the_named_environment_variable_or_file(tmp_path: Path) -> None:
    args = type("A", (), {"secret_env": "MY_KEY", "secret_file": None})()
    assert commands_admin.read_secret(args, {"MY_KEY": "  sk-abc \n"}) == "sk-abc"  # type: ignore[arg-type]
    (tmp_path / "secret").write_text("sk-from-file\n")
    args = type("A", (), {"secret_env": None, "secret_file": tmp_path / "secret"})()
    assert commands_admin.read_secret(args, {}) == "sk-from-file"  # type: ignore[arg-type]


def test_a_soft_limit_above_the_hard_limit_is_refused_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["budgets", "set", "--team", "a", "--window", "daily", "--limit", "1", "--soft", "2"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "error: --soft must not exceed --limit"


# --------------------------------------------------------------------------- endpoints and certificates


def test_a_missing_endpoints_file_is_one_clear_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.json"
    assert main(["models", "--endpoints", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: endpoints file {missing} not found")
    assert "igw up" in err
    assert "Traceback" not in err


def test_the_endpoints_file_defaults_to_igw_endpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IGW_ENDPOINTS", str(tmp_path / "from-env.json"))
    assert main(["spend"]) == 2
    assert "from-env.json not found" in capsys.readouterr().err


def test_an_endpoints_file_naming_a_missing_certificate_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "endpoints.json"
    path.write_text(
        json.dumps(
            {
                "router": "127.0.0.1:1",
                "ca": str(tmp_path / "ca.pem"),
                "operator_cert": str(tmp_path / "op.pem"),
                "operator_key": str(tmp_path / "op-key.pem"),
            }
        )
    )
    assert load_endpoints(path).address("router") == "127.0.0.1:1"
    assert main(["deployments", "--endpoints", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: certificate file {tmp_path / 'op.pem'} not found\n"


def test_an_expired_certificate_is_refused_before_any_call(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = pki_mod.issue_cert(
        (pki / "ca.pem").read_bytes(),
        (pki / "ca-key.pem").read_bytes(),
        "spiffe://igw.local/operator/old",
        valid_for=dt.timedelta(hours=1),
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
    )
    (tmp_path / "old.pem").write_bytes(cert)
    (tmp_path / "old-key.pem").write_bytes(key)
    argv = ["config", "show", "--address", "127.0.0.1:1", "--cert", str(tmp_path / "old.pem")]
    argv += ["--key", str(tmp_path / "old-key.pem"), "--ca", str(pki / "ca.pem")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "expired at" in err
    assert "igw pki issue operator old" in err
    assert err.count("\n") == 1


# --------------------------------------------------------------------------- errors


def test_a_budget_error_prints_one_line_with_the_remaining_budget_in_dollars() -> None:
    err = server_errors.ResourceExhausted(
        "BUDGET_EXCEEDED",
        "team budget exhausted",
        {"remaining_nanos": 1_250_000, "limit_nanos": 5_000_000_000, "team": "demo", "window": "DAILY"},
    )
    status = server_errors.to_status(err, "ledger.igw")

    class Rpc(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return status.code

        def details(self) -> str:
            return status.details

        def trailing_metadata(self) -> object:
            return status.trailing_metadata

    line = format_error(error_from_rpc_error(Rpc()))
    assert line.startswith("error: RESOURCE_EXHAUSTED BUDGET_EXCEEDED: team budget exhausted (")
    assert "remaining $0.00125" in line
    assert "limit $5.00" in line
    assert "\n" not in line


# --------------------------------------------------------------------------- igw probe


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("igw.router.v1.RouterService", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("draining", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_probe_exit_codes_follow_grpc_health_probe(
    health_server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    address, _ = health_server
    assert main(["probe", address]) == 0
    assert capsys.readouterr().out.strip() == "status: SERVING"
    assert main(["probe", address, "igw.router.v1.RouterService"]) == 0
    assert main(["probe", address, "draining"]) == 4
    assert main(["probe", address, "no.such.Service"]) == 3  # NOT_FOUND: an RPC failure


def test_probe_of_a_closed_port_is_a_connection_failure() -> None:
    assert main(["probe", "127.0.0.1:1", "--connect-timeout", "0.3"]) == 2


@pytest.mark.parametrize("argv", [["probe"], ["probe", "no-port"], ["probe", "h:99999"], ["probe", "h:1", "--bogus"]])
def test_probe_usage_errors_exit_1(argv: list[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 1


def test_table_amounts_are_decimal_strings_not_floats() -> None:
    assert Decimal(nanos_to_dollars(3).removeprefix("$")) == Decimal("0.000000003")
