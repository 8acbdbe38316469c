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


def _res(router: float, vault: float, ledger: float, pg: float) -> dict[str, object]:
    return {"pass": True, "procs": {"router": {"cpu_ms_per_call": router}, "keyvault": {"cpu_ms_per_call": vault},
                                    "ledger": {"cpu_ms_per_call": ledger}, "postgres": {"cpu_ms_per_call": pg}}}


def test_the_comparison_pairs_steps_and_takes_the_median_ratio() -> None:
    from bench.baseline import comparison, markdown

    results = {
        "rig": {"baseline": {"commit": "8729faf"}},
        "scenarios": {
            "rate": {"steps": [
                {"rate": 50, "results": {"igw": _res(4, 2, 2, 2), "base": _res(3, 2, 2, 3)}},      # 10 / 10
                {"rate": 100, "results": {"igw": _res(3, 1, 1, 1), "base": _res(4, 2, 1, 1)}},     # 6 / 8
                {"rate": 150, "results": {"igw": _res(3, 1, 1, 1), "base": _res(2, 1, 1, 1)}},     # 6 / 5
                {"rate": 200, "results": {"igw": _res(3, 1, 1, 1)}},                               # no baseline
            ]},
            "c1": {"d0": {"added_ms": {"igw": {"p50": 6.5}, "base": {"p50": 7.0}}}},
        },
    }
    cmp = comparison(results)
    assert [(r["rate"], r["this"], r["base"], r["ratio"]) for r in cmp["rate"]["steps"]] == [
        (50, 10, 10, 1.0), (100, 6, 8, 0.75), (150, 6, 5, 1.2)]
    assert cmp["rate"]["median_ratio"] == 1.0 and "hot" not in cmp
    assert cmp["c1_added_p50_ms"] == {"d0": {"igw": 6.5, "base": 7.0}}
    text = "\n".join(markdown(results))
    assert "| many teams | 100 | 6.00 | 8.00 | 0.75 |" in text and "**1.00** over 3 steps" in text
    assert comparison({"scenarios": {}}) == {} and markdown({"scenarios": {}}) == []
