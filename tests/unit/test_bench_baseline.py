"""The bench's baseline (bench/baseline.py): another checkout's gateway measured in the same run.

Its CPU per call is read from the same role names as this run's, and its config is this run's
without the budget_slices block (the baseline's own defaults)."""

from __future__ import annotations

from bench.baseline import base_config, own_procs, owner


def test_systems_belong_to_their_stack() -> None:
    assert [owner(s) for s in ("igw", "igw-hot", "igw-hot-percall", "base", "base-hot", "litellm", "direct")] == [
        "igw", "igw", "igw", "base", "base", "litellm", "direct"]


def test_a_baseline_result_names_the_baselines_processes_by_role_and_drops_this_runs() -> None:
    procs = {
        "router": {"cpu_s": 1.0}, "keyvault": {"cpu_s": 2.0}, "ledger": {"cpu_s": 3.0}, "postgres": {"cpu_s": 4.0},
        "igw-up": {"cpu_s": 0.1}, "base-router": {"cpu_s": 10.0}, "base-keyvault": {"cpu_s": 20.0},
        "base-ledger": {"cpu_s": 30.0}, "base-postgres": {"cpu_s": 40.0}, "base-up": {"cpu_s": 0.2},
        "loadgen": {"cpu_s": 5.0}, "fake-d20": {"cpu_s": 6.0},
    }
    base = own_procs("base-hot", procs)
    assert base == {"router": {"cpu_s": 10.0}, "keyvault": {"cpu_s": 20.0}, "ledger": {"cpu_s": 30.0},
                    "postgres": {"cpu_s": 40.0}, "up": {"cpu_s": 0.2}, "loadgen": {"cpu_s": 5.0},
                    "fake-d20": {"cpu_s": 6.0}}
    mine = own_procs("igw", procs)
    assert mine["router"] == {"cpu_s": 1.0} and not any(k.startswith("base-") for k in mine)
    assert set(mine) == {"router", "keyvault", "ledger", "postgres", "igw-up", "loadgen", "fake-d20"}


def test_the_baseline_config_drops_only_the_budget_slices_block() -> None:
    config = """version: 1
limits: {max_in_flight: 4096}
# Adaptive budget slices (the default) for every team but the per-call teams, which take a
# Reserve per call: both measured side by side.
budget_slices:
  enabled: true
  per_call_teams: [pc-t000, pc-hot]
"""
    assert base_config(config) == "version: 1\nlimits: {max_in_flight: 4096}\n"
    assert base_config("version: 1\nretries: {max_attempts: 3}\n") == "version: 1\nretries: {max_attempts: 3}\n"
