"""A second igw from another checkout, measured in the same run as this one (``--baseline DIR``).

Runs on this shared machine differ by more than most changes (bench/analysis.md: the same code's
CPU per call moved by half between two runs minutes apart). A before-and-after figure is only
worth quoting when both sides ran in one run, step by step. So the bench can start a second
gateway from another commit's checkout (``git worktree add ../igw-base 8729faf``) with its own
virtualenv (``--baseline-python``), its own embedded Postgres, PKI and state, and run it through
the same ladders next to this one:

- ``base`` (the many-teams ladder), ``base-hot`` (one hot team) and ``base`` in ``c1``;
- the baseline runs its own default settings: its routing config is this run's without the
  ``budget_slices`` block (at 8729faf, slices were opt-in and per-call holds the default);
- while one system is measured the other's processes are suspended (``--no-pause-others`` keeps
  them running), and each result's ``procs`` names the measured system's processes by role
  (``router``, ``keyvault``, ``ledger``, ``postgres``), so CPU per call is read the same way for both.

The baseline's spend entries are not checked (its ledger is the old code's; the check is for this one).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procstats

#: The process groups of the baseline, as registered in the rig's ProcSet.
GROUPS = ("base-router", "base-keyvault", "base-ledger", "base-postgres", "base-up")
PREFIX = "base-"


def owner(system: str) -> str:
    """Which stack a system name belongs to: ``base`` / ``base-hot`` -> base, ``igw-*`` -> igw."""
    return system.split("-", 1)[0]


def own_procs(system: str, procs: dict[str, Any]) -> dict[str, Any]:
    """The measured system's process groups under their role names, plus the shared ones (load
    generator, fakes). A baseline's ``base-router`` becomes ``router``; this run's ``router`` is
    dropped from a baseline result and ``base-*`` from every other."""
    if owner(system) == "base":
        out = {k[len(PREFIX):]: v for k, v in procs.items() if k.startswith(PREFIX)}
        out.update({k: v for k, v in procs.items()
                    if not k.startswith(PREFIX) and k not in ("router", "keyvault", "ledger", "postgres", "igw-up")})
        return out
    return {k: v for k, v in procs.items() if not k.startswith(PREFIX)}


def base_config(config: str) -> str:
    """This run's routing config without its ``budget_slices`` block: the baseline's own defaults."""
    return re.sub(r"(?ms)^(# [^\n]*\n)*budget_slices:\n(  [^\n]*\n)*", "", config)


@dataclass
class Baseline:
    """The baseline gateway: started from ``root`` with ``python``, state under ``state``."""

    root: Path
    python: str
    state: Path
    up: subprocess.Popen[bytes] | None = None
    endpoints: dict[str, Any] = field(default_factory=dict)
    many_certs: list[list[str]] = field(default_factory=list)
    hot_certs: list[list[str]] = field(default_factory=list)
    commit: str = ""

    def start(self, rig: Any, hot_team: str, hot_agents: int) -> None:
        """Starts the baseline's ``igw up`` on free ports and provisions it like this run's gateway."""
        self.state.mkdir(parents=True, exist_ok=True)
        cfg = self.state / "bench-router.yaml"
        cfg.write_text(base_config(rig.routing_config()))
        try:
            self.commit = subprocess.run(["git", "-C", str(self.root), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            self.commit = ""
        log = open(self.state / "up.log", "ab")
        igw_state = self.state / "igw"
        self.up = subprocess.Popen(
            [self.python, "-m", "services.cli.main", "up", "--state-dir", str(igw_state), "--ports", "auto",
             "--config", str(cfg), "--no-demo"],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(self.root),
        )
        self.endpoints = procstats.wait_for_endpoints(
            self.up, igw_state / "endpoints.json", self.state / "up.log", "the baseline's igw up")
        pids = self.endpoints["pids"]
        for svc in ("router", "keyvault", "ledger"):
            rig.procs.add(PREFIX + svc, pids.get(svc))
        pm = procstats.postmaster_pid(igw_state / "pg")
        if pm:
            rig.procs.add(PREFIX + "postgres", pm, children=True)
        rig.procs.add(PREFIX + "up", self.up.pid)
        self._provision(rig, hot_team, hot_agents)

    def _provision(self, rig: Any, hot_team: str, hot_agents: int) -> None:
        from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
        from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
        from igw_dev.pki import issue_to_dir

        with rig.operator_channel(self.endpoints, self.endpoints["keyvault"]) as ch:
            stub = keyvault_pb2_grpc.KeyVaultAdminServiceStub(ch)
            for n, fk in rig.fakes.items():
                stub.CreateProviderKey(keyvault_pb2.CreateProviderKeyRequest(
                    request_id=f"{rig.run_id}-base-key-{n}", name=f"bench-{n}-{fk.port}", provider=f"bench-{n}",
                    secret=rig.api_key, base_url=fk.base, all_teams=True, labels={"bench": "true"},
                ), timeout=30)
        pki = Path(self.endpoints["ca"]).parent

        def issue(team: str, agent: str) -> list[str]:
            cert, key = issue_to_dir(pki, "agent", team, agent)
            rig.cert_team[str(cert)] = team
            return [str(cert), str(key)]

        teams = rig.many_teams()
        self.many_certs = [issue(t, "a0") for t in teams]
        self.hot_certs = [issue(hot_team, f"a{a}") for a in range(hot_agents)]
        with rig.operator_channel(self.endpoints, self.endpoints["ledger"]) as ch:
            stub = ledger_pb2_grpc.LedgerAdminServiceStub(ch)
            for t in [*teams, hot_team]:
                stub.SetBudget(ledger_pb2.SetBudgetRequest(
                    team=t, window=ledger_pb2.BUDGET_WINDOW_TOTAL, limit_nanos=10**15), timeout=30)

    def job(self, alias: str, certs: list[list[str]], mode: str, **kw: Any) -> dict[str, Any]:
        """A load-generator job against the baseline's router (as ``Rig.igw_job``)."""
        return {"kind": "grpc", "key": f"base-{len(certs)}-{certs[0][0]}", "target": self.endpoints["router"],
                "ca": self.endpoints["ca"], "certs": certs, "model": alias, "mode": mode, **kw}

    def info(self) -> dict[str, Any]:
        return {"root": str(self.root), "commit": self.commit, "python": self.python,
                "router": self.endpoints.get("router")}

    def stop(self) -> None:
        procstats.stop_process(self.up)


def _total(res: dict[str, Any]) -> float | None:
    procs = res.get("procs") or {}
    parts = [(procs.get(p) or {}).get("cpu_ms_per_call") for p in ("router", "keyvault", "ledger", "postgres")]
    return round(sum(parts), 3) if all(v is not None for v in parts) else None  # type: ignore[arg-type]


def comparison(results: dict[str, Any]) -> dict[str, Any]:
    """This run's default path against the baseline's, step by step in the same run.

    For every ladder step that measured both (``igw`` and ``base``; ``igw-hot`` and ``base-hot``):
    CPU ms per call (router + vault + ledger + Postgres) of each and their ratio; the median ratio
    per ladder; and the added p50 at one call in flight of both.
    """
    out: dict[str, Any] = {"baseline": (results.get("rig") or {}).get("baseline")}
    if not out["baseline"]:
        return {}
    for ladder, mine, base in (("rate", "igw", "base"), ("hot", "igw-hot", "base-hot")):
        rows = []
        for st in ((results.get("scenarios") or {}).get(ladder) or {}).get("steps") or []:
            r = st.get("results") or {}
            if mine in r and base in r:
                a, b = _total(r[mine]), _total(r[base])
                if a is not None and b:
                    rows.append({"rate": st["rate"], "this": a, "base": b, "ratio": round(a / b, 3),
                                 "this_pass": r[mine].get("pass"), "base_pass": r[base].get("pass")})
        if rows:
            ratios = sorted(x["ratio"] for x in rows)
            n = len(ratios)
            median = ratios[n // 2] if n % 2 else round((ratios[n // 2 - 1] + ratios[n // 2]) / 2, 3)
            out[ladder] = {"steps": rows, "median_ratio": median}
    c1 = (results.get("scenarios") or {}).get("c1") or {}
    out["c1_added_p50_ms"] = {
        fake: {s: ((c1.get(fake) or {}).get("added_ms") or {}).get(s, {}).get("p50") for s in ("igw", "base")}
        for fake in ("d0", "d20") if fake in c1
    }
    return out


def markdown(results: dict[str, Any]) -> list[str]:
    """The report's section for a run with ``--baseline`` (empty without one)."""
    cmp = comparison(results)
    if not cmp:
        return []
    b = cmp["baseline"]
    L = [
        f"### Against the baseline {b.get('commit') or b.get('root')}, in the same run",
        "",
        f"`--baseline` ran {b.get('commit') or b.get('root')} (its own virtualenv, Postgres, PKI; its own "
        "default settings) through the same ladders, interleaved step by step with this checkout "
        "(bench/baseline.py). CPU ms per call, router + vault + ledger + Postgres; ratio this / baseline.",
        "",
        "| ladder | rate/s | this checkout | baseline | ratio |",
        "|---|---|---|---|---|",
    ]
    for ladder in ("rate", "hot"):
        for row in (cmp.get(ladder) or {}).get("steps", []):
            L.append(f"| {'many teams' if ladder == 'rate' else 'one hot team'} | {row['rate']} | "
                     f"{row['this']:.2f} | {row['base']:.2f} | {row['ratio']:.2f} |")
    L.append("")
    for ladder in ("rate", "hot"):
        if ladder in cmp:
            L.append(f"- median ratio, {'many teams' if ladder == 'rate' else 'one hot team'}: "
                     f"**{cmp[ladder]['median_ratio']:.2f}** over {len(cmp[ladder]['steps'])} steps")
    for fake, v in (cmp.get("c1_added_p50_ms") or {}).items():
        if v.get("igw") is not None and v.get("base") is not None:
            L.append(f"- added p50 at one call in flight, fake {fake[1:]} ms: {v['igw']:.2f} ms against "
                     f"{v['base']:.2f} ms")
    return [*L, ""]
