"""The benchmark scenarios (issue 7): the rig, the runs, the spend check and the profiles.

The rig, all on loopback on this machine:

* the bench's own fakes (``python -m igw_dev.fakes``): ``d0`` (no delay), ``d20`` (20 ms),
  ``flaky`` (answers 429 to 20 % of calls) and ``backup`` (the fallback);
* the whole gateway from ``python -m services.cli.main up --ports auto --config <bench routing
  config>``: embedded Postgres (durable: fsync on), ledger, keyvault, router, with the bench
  providers' keys created in the vault and huge TOTAL budgets for the bench teams, so every
  call does mTLS, a vault lease, a ledger hold and an exact settle;
* LiteLLM's proxy against the same fakes (optional);
* one load generator process (:mod:`bench.loadgen`).

Scenarios: ``ceiling`` (the fake's own), ``c1`` (one call in flight: direct, igw, LiteLLM,
interleaved rounds), ``rate`` (open-loop ladder, igw across many teams vs LiteLLM vs direct,
interleaved per step), ``hot`` (one team), ``stream`` (time to first token), ``fallback``
(primary 429 at 20 %), ``edge`` (the HTTPS edge next to gRPC and LiteLLM), then ``profile`` (py-spy on router, ledger, keyvault under load).

The ``igw`` systems run at the default settings: adaptive budget slices for every team. Per-call
holds (a ``Reserve`` per call, a configuration choice) are measured side by side in the same run:
a second set of teams (``pc-t000``...) and a second hot team (``pc-hot``) are listed in the bench's
``budget_slices.per_call_teams``, and the ``rate`` and ``hot`` ladders run ``igw-percall`` /
``igw-hot-percall`` through them next to ``igw`` / ``igw-hot``. The ``limit`` scenario drives one
team of each kind to its limit, one call at a time, and checks that the defaults never overspend
and are refused no earlier than per-call holds.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import baseline as baseline_mod
from bench import procstats
from bench.loadgen import LoadGen, percentiles

ROOT = Path(__file__).resolve().parents[1]
ALL_SCENARIOS = (
    "ceiling", "c1", "rate", "hot", "limit", "stream", "fallback", "rate-litellm-default", "edge", "profile",
)
ADDED_P99_BOUND_MS = 50.0
# The process groups of each system under test (see Rig.start and Rig.start_gateway).
_SYSTEM_GROUPS = {
    "igw": ("router", "keyvault", "ledger", "postgres", "igw-up"),
    "litellm": ("litellm",),
    "base": baseline_mod.GROUPS,  # --baseline: another checkout's gateway (bench/baseline.py)
}
HOT_TEAM = "bhot"
HOT_PERCALL_TEAM = "pc-hot"
HOT_AGENTS = 4
# The limit scenario: a team at the defaults and one with per-call holds, each driven to a limit
# of LIMIT_CALLS calls' worth of spend (and half a call more), one call at a time.
LIMIT_TEAM = "lim"
LIMIT_PERCALL_TEAM = "pc-lim"
LIMIT_CALLS = 120


@dataclass
class Options:
    """What to run and how long."""

    quick: bool = False
    scenarios: tuple[str, ...] = ALL_SCENARIOS
    litellm: bool = True
    litellm_workers: int = 1
    # Suspend the other system's processes (SIGSTOP) while one is measured, so an idle
    # neighbour's timers and background loops do not tax the one under test.
    pause_others: bool = True
    profile: bool = True
    teams: int = 100
    keep_state: bool = False
    rates: tuple[int, ...] = ()
    step_override: float | None = None
    c1_n_override: int | None = None
    router_workers: int = 1
    # Another checkout (and its virtualenv's python) to run next to this one as ``base`` systems.
    baseline_dir: Path | None = None
    baseline_python: str = ""
    log: Any = print

    # derived knobs
    @property
    def c1_n(self) -> int:
        if self.c1_n_override:
            return self.c1_n_override
        return 40 if self.quick else 400

    @property
    def c1_rounds(self) -> int:
        return 1 if self.quick else 3

    @property
    def step_s(self) -> float:
        if self.step_override:
            return self.step_override
        return 1.0 if self.quick else 8.0

    @property
    def warm_s(self) -> float:
        if self.step_override:
            return min(0.3, self.step_override / 2)
        return 0.3 if self.quick else 2.0

    @property
    def ladder(self) -> tuple[int, ...]:
        if self.rates:
            return self.rates
        if self.quick:
            return (20, 50)
        # Low steps too: a slow or busy machine (or LiteLLM) may not hold 50/s.
        return (10, 20, 30, 40, 50, 60, 75, 100, 125, 150, 200, 250, 300, 400, 500, 600, 800, 1000, 1200, 1600, 2000)


@dataclass
class Fake:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    delay_ms: int
    fault: str | None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@dataclass
class Rig:
    """Everything started for one benchmark run."""

    opts: Options
    state: Path
    run_id: str
    api_key: str
    fakes: dict[str, Fake] = field(default_factory=dict)
    up: subprocess.Popen[bytes] | None = None
    endpoints: dict[str, Any] = field(default_factory=dict)
    many_certs: list[list[str]] = field(default_factory=list)
    hot_certs: list[list[str]] = field(default_factory=list)
    # The same shapes for teams listed in the routing config's budget_slices.per_call_teams.
    percall_certs: list[list[str]] = field(default_factory=list)
    hot_percall_certs: list[list[str]] = field(default_factory=list)
    limit_certs: dict[str, list[list[str]]] = field(default_factory=dict)
    cert_team: dict[str, str] = field(default_factory=dict)  # agent cert path -> team
    rid_owner: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)  # rid prefix -> system, teams
    lg: LoadGen | None = None
    procs: procstats.ProcSet = field(default_factory=procstats.ProcSet)
    litellm: Any = None
    baseline: baseline_mod.Baseline | None = None
    seq: int = 0
    expected: dict[str, set[str]] = field(default_factory=dict)  # scenario -> request ids answered OK
    client_failed: dict[str, set[str]] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)

    def log(self, msg: str) -> None:
        self.opts.log(f"[bench {time.strftime('%H:%M:%S')}] {msg}")

    def many_teams(self) -> list[str]:
        return [f"bt{i:03d}" for i in range(self.opts.teams)]

    def percall_teams(self) -> list[str]:
        """The many-teams set again, with per-call holds (listed in the routing config)."""
        return [f"pc-t{i:03d}" for i in range(self.opts.teams)]

    # ------------------------------------------------------------------ set-up

    def start_fake(self, name: str, delay_ms: int = 0, fault: str | None = None) -> Fake:
        port_file = self.state / f"{name}.port"
        args = [
            sys.executable,
            "-m",
            "igw_dev.fakes",
            "--kind",
            "openai",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--delay-ms",
            str(delay_ms),
        ]
        if fault:
            args += ["--fault", fault]
        log = open(self.state / f"{name}.log", "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                env={**os.environ, "IGW_FAKE_API_KEY": self.api_key})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"fake {name} exited; see {self.state / (name + '.log')}")
            if port_file.exists() and port_file.read_text().strip():
                fake = Fake(name, int(port_file.read_text().strip()), proc, delay_ms, fault)
                self.fakes[name] = fake
                self.procs.add(f"fake-{name}", proc.pid)
                return fake
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"fake {name} did not start")

    def routing_config(self) -> str:
        f = self.fakes
        providers = "\n".join(
            f'  bench-{n}: {{type: openai, base_url: "{fk.base}", local: true}}' for n, fk in f.items()
        )
        deployments = "\n".join(
            f"  bench-{n}-small: {{provider: bench-{n}, model: fake-small, price: fake-small}}" for n in f
        )
        return f"""# igw routing config written by bench/scenarios.py for one benchmark run.
version: 1
providers:
{providers}
deployments:
{deployments}
models:
  bench-d0:
    description: "bench: the zero-delay fake"
    candidates: [bench-d0-small]
  bench-d20:
    description: "bench: the 20 ms fake"
    candidates: [bench-d20-small]
  bench-fallback:
    description: "bench: a primary answering 429 to 20% of calls, falling back to a healthy fake"
    strategy: priority
    candidates: [bench-flaky-small, bench-backup-small]
retries: {{max_attempts: 3, backoff_initial_ms: 50, backoff_max_ms: 1000, retry_after_cap_ms: 2000}}
timeouts: {{connect_ms: 2000, first_byte_ms: 30000, idle_ms: 30000, total_ms: 120000}}
# A high threshold: at 20% independent 429s the breaker should not open during the run, so the
# fallback scenario measures the fallback path itself, not the breaker skipping the primary.
breaker: {{failure_threshold: 1000, cooldown_ms: 10000, probe_timeout_ms: 5000}}
limits: {{max_in_flight: 4096}}
# Adaptive budget slices (the default) for every team but the bench's per-call teams (the
# igw-percall systems), which take a Reserve per call: both measured side by side.
budget_slices:
  enabled: true
  per_call_teams: [{", ".join([*self.percall_teams(), HOT_PERCALL_TEAM, LIMIT_PERCALL_TEAM])}]
"""

    def start_gateway(self) -> None:
        cfg = self.state / "bench-router.yaml"
        cfg.write_text(self.routing_config())
        igw_state = self.state / "igw"
        log = open(self.state / "up.log", "ab")
        self.up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli.main",
                "up",
                "--state-dir",
                str(igw_state),
                "--ports",
                "auto",
                "--config",
                str(cfg),
                *(["--router-workers", str(self.opts.router_workers)] if self.opts.router_workers > 1 else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
        )
        self.endpoints = procstats.wait_for_endpoints(
            self.up, igw_state / "endpoints.json", self.state / "up.log", "igw up")
        pids = self.endpoints["pids"]
        for svc in ("router", "keyvault", "ledger"):
            # Router workers (--router-workers) are children of the router's supervisor.
            self.procs.add(svc, pids.get(svc), children=svc == "router" and self.opts.router_workers > 1)
        pm = procstats.postmaster_pid(igw_state / "pg")
        if pm:
            self.procs.add("postgres", pm, children=True)
        self.procs.add("igw-up", self.up.pid)
        self._provision()

    def _operator(self, addr: str) -> Any:
        return self.operator_channel(self.endpoints, addr)

    @staticmethod
    def operator_channel(ep: dict[str, Any], addr: str) -> Any:
        """A blocking operator channel to one service of the gateway whose endpoints are ``ep``."""
        import grpc

        creds = grpc.ssl_channel_credentials(
            Path(ep["ca"]).read_bytes(), Path(ep["operator_key"]).read_bytes(), Path(ep["operator_cert"]).read_bytes()
        )
        return grpc.secure_channel(addr, creds, options=(("grpc.ssl_target_name_override", "localhost"),))

    def _provision(self) -> None:
        from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
        from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
        from igw_dev.pki import issue_to_dir

        with self._operator(self.endpoints["keyvault"]) as ch:
            stub = keyvault_pb2_grpc.KeyVaultAdminServiceStub(ch)
            for n, fk in self.fakes.items():
                name = f"bench-{n}-{fk.port}"
                stub.CreateProviderKey(
                    keyvault_pb2.CreateProviderKeyRequest(
                        request_id=f"{self.run_id}-key-{name}",
                        name=name,
                        provider=f"bench-{n}",
                        secret=self.api_key,
                        base_url=fk.base,
                        all_teams=True,
                        labels={"bench": "true"},
                    ),
                    timeout=30,
                )
        pki = Path(self.endpoints["ca"]).parent

        def issue(team: str, agent: str) -> list[str]:
            cert, key = issue_to_dir(pki, "agent", team, agent)
            self.cert_team[str(cert)] = team
            return [str(cert), str(key)]

        teams, percall_teams = self.many_teams(), self.percall_teams()
        self.many_certs += [issue(t, "a0") for t in teams]
        self.hot_certs += [issue(HOT_TEAM, f"a{a}") for a in range(HOT_AGENTS)]
        self.percall_certs += [issue(t, "a0") for t in percall_teams]
        self.hot_percall_certs += [issue(HOT_PERCALL_TEAM, f"a{a}") for a in range(HOT_AGENTS)]
        self.limit_certs = {t: [issue(t, "a0")] for t in (LIMIT_TEAM, LIMIT_PERCALL_TEAM)}
        with self._operator(self.endpoints["ledger"]) as ch:
            stub = ledger_pb2_grpc.LedgerAdminServiceStub(ch)
            for t in [*teams, HOT_TEAM, *percall_teams, HOT_PERCALL_TEAM, LIMIT_TEAM, LIMIT_PERCALL_TEAM]:
                stub.SetBudget(
                    ledger_pb2.SetBudgetRequest(team=t, window=ledger_pb2.BUDGET_WINDOW_TOTAL, limit_nanos=10**15),
                    timeout=30,
                )

    def start(self) -> None:
        self.log(f"state dir {self.state}")
        self.start_fake("d0")
        self.start_fake("d20", delay_ms=20)
        self.start_fake("flaky", fault=json.dumps({"status": 429, "probability": 0.2}))
        self.start_fake("backup")
        self.log("fakes up: " + ", ".join(f"{n}:{f.port}" for n, f in self.fakes.items()))
        self.start_gateway()
        self.log(f"igw up: router {self.endpoints['router']}")
        self.lg = LoadGen(cwd=str(ROOT), log_path=str(self.state / "loadgen.log"))
        self.procs.add("loadgen", self.lg.pid)
        if self.opts.litellm:
            self.start_litellm(self.opts.litellm_workers)
        if self.opts.baseline_dir is not None:
            self.baseline = baseline_mod.Baseline(
                self.opts.baseline_dir, self.opts.baseline_python or sys.executable, self.state / "baseline")
            self.baseline.start(self, HOT_TEAM, HOT_AGENTS)
            self.log(f"baseline {self.baseline.commit} up: router {self.baseline.endpoints['router']}")
        # One sanity call through every path before measuring.
        for alias in ("bench-d0", "bench-d20", "bench-fallback"):
            res = self.measure(
                "sanity", "igw", self.igw_job(alias, self.many_certs[:1], "closed", n=3, warmup=0), record=True
            )
            if res["errors"]:
                raise RuntimeError(f"igw sanity call to {alias} failed: {res['errors']}")
        # The defaults draw from budget slices once a key is busy (its 4th call within 5 s, with
        # two or more in flight at once: calls back to back take per-call holds): the router
        # falls back to Reserve when it cannot get a slice, so a broken slices path would still
        # answer; its counters tell them apart (one worker's counters: one worker only).
        res = self.measure(
            "sanity", "igw", self.igw_job("bench-d20", self.many_certs[:1], "concurrent", concurrency=4,
                                          duration=0.5, warmup_s=0), record=True
        )
        sl = res.get("slices")
        if res["errors"]:
            raise RuntimeError(f"igw sanity calls with budget slices failed: {res['errors']}")
        if sl is not None and self.opts.router_workers == 1 and sl["draws"] < 1:
            raise RuntimeError(
                f"budget slices not used: {res['ok']} busy calls answered but {sl['draws']} slice draws "
                f"(slice events {sl['events']}); see {self.state / 'igw'} router log"
            )
        res = self.measure(
            "sanity", "igw-percall", self.igw_job("bench-d20", self.percall_certs[:1], "closed", n=3, warmup=0)
        )
        if res["errors"]:
            raise RuntimeError(f"igw sanity call with per-call holds failed: {res['errors']}")
        sl = res.get("slices")
        if sl is not None and self.opts.router_workers == 1 and sl["draws"]:
            raise RuntimeError(f"per-call teams drew from budget slices ({sl['draws']} draws)")

    def start_litellm(self, workers: int) -> None:
        """(Re)starts the LiteLLM proxy with ``workers`` workers against the d0 and d20 fakes."""
        from bench.litellm_setup import start_proxy

        if self.litellm is not None:
            self.litellm.stop()
        self.litellm = start_proxy(
            self.state,
            {
                "bench-d0": (self.fakes["d0"].base, self.api_key),
                "bench-d20": (self.fakes["d20"].base, self.api_key),
            },
            workers=workers,
        )
        self.procs.add("litellm", self.litellm.proc.pid, children=True)
        self.log(f"litellm {self.litellm.version} up on {self.litellm.port} ({workers} worker)")

    def stop(self) -> None:
        # Nothing may be left suspended: a stopped process would not even act on SIGTERM.
        self._resume([p for pid, ch in self.procs.groups.values() for p in procstats.proc_group(pid, ch)])
        if self.lg is not None:
            self.lg.close()
        if self.litellm is not None:
            self.litellm.stop()
        if self.baseline is not None:
            self.baseline.stop()
        procstats.stop_process(self.up)
        for fk in self.fakes.values():
            if fk.proc.poll() is None:
                fk.proc.terminate()
                try:
                    fk.proc.wait(10)
                except subprocess.TimeoutExpired:
                    fk.proc.kill()
        if not self.opts.keep_state:
            shutil.rmtree(self.state, ignore_errors=True)

    # ------------------------------------------------------------------ jobs

    def direct_job(self, fake: str, mode: str, **kw: Any) -> dict[str, Any]:
        return {
            "kind": "http",
            "key": f"direct-{fake}",
            "url": self.fakes[fake].base + "/chat/completions",
            "headers": {"authorization": f"Bearer {self.api_key}"},
            "model": "fake-small",
            "mode": mode,
            **kw,
        }

    def litellm_job(self, model: str, mode: str, **kw: Any) -> dict[str, Any]:
        return {"kind": "http", "key": "litellm", "url": self.litellm.url, "model": model, "mode": mode, **kw}

    def igw_job(self, alias: str, certs: list[list[str]], mode: str, **kw: Any) -> dict[str, Any]:
        key = f"igw-{len(certs)}-{certs[0][0]}"
        return {
            "kind": "grpc",
            "key": key,
            "target": self.endpoints["router"],
            "ca": self.endpoints["ca"],
            "certs": certs,
            "model": alias,
            "mode": mode,
            **kw,
        }

    def slice_counters(self) -> dict[str, Any] | None:
        """The router's budget-slice counters (draws and slice events), from its metrics endpoint."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        url = (self.endpoints.get("metrics") or {}).get("router")
        if not url:
            return None
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        out: dict[str, Any] = {"draws": 0, "events": {}, "notes": 0, "note_batches": 0}
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                if sample.name == "igw_router_slice_draws_total":
                    out["draws"] = int(sample.value)
                elif sample.name == "igw_router_slice_draw_notes_total":
                    out["notes"] += int(sample.value)  # draws and withdrawals, every result
                elif sample.name == "igw_router_slice_draw_note_batches_total":
                    out["note_batches"] = int(sample.value)
                elif sample.name == "igw_router_budget_slices_total":
                    out["events"][sample.labels.get("event", "")] = int(sample.value)
        return out

    def quiesce(self, limit_s: float = 30.0, idle_cores: float = 0.15) -> float:
        """Waits until the processes under test are idle (an overloaded system keeps working off
        its backlog after the load generator gave up, which would tax the next system's step)."""
        t0 = time.monotonic()
        prev = self.procs.snapshot()
        while time.monotonic() - t0 < limit_s:
            time.sleep(0.5)
            cur = self.procs.snapshot()
            used = sum(cur[k]["cpu_s"] - prev[k]["cpu_s"] for k in cur if k in prev)
            prev = cur
            if used / 0.5 < idle_cores:
                break
        return time.monotonic() - t0

    def _pause_others(self, system: str) -> list[psutil.Process]:
        """Suspends the processes of every system but ``system`` (for "direct": both)."""
        if not self.opts.pause_others:
            return []
        stopped: list[psutil.Process] = []
        mine = baseline_mod.owner(system)  # "igw-hot" is igw, "base-hot" the baseline
        for owner, groups in _SYSTEM_GROUPS.items():
            if owner == mine:
                continue
            for group in groups:
                if group not in self.procs.groups:
                    continue
                pid, children = self.procs.groups[group]
                for proc in procstats.proc_group(pid, children):
                    try:
                        proc.suspend()
                        stopped.append(proc)
                    except psutil.Error:
                        continue
        return stopped

    @staticmethod
    def _resume(stopped: list[psutil.Process]) -> None:
        for proc in stopped:
            try:
                proc.resume()
            except psutil.Error:
                continue

    def measure(self, scenario: str, system: str, job: dict[str, Any], record: bool = True) -> dict[str, Any]:
        """Runs one job with CPU/RSS accounting; igw jobs get unique request ids for the spend check."""
        self.quiesce()
        stopped = self._pause_others(system)
        try:
            return self._measure(scenario, system, job, record)
        finally:
            self._resume(stopped)

    def _measure(self, scenario: str, system: str, job: dict[str, Any], record: bool) -> dict[str, Any]:
        assert self.lg is not None
        self.seq += 1
        slices0 = None
        if job["kind"] == "grpc" or job.get("rid_header"):
            job["rid_prefix"] = f"{self.run_id}.{scenario}.{self.seq}."
            # Outside the timed window: the scrape costs the router a little CPU.
            slices0 = self.slice_counters() if baseline_mod.owner(system) != "base" else None
        before = self.procs.snapshot()
        cpu0 = psutil.cpu_times()
        t0 = time.monotonic()
        res = self.lg.run(job)
        wall = time.monotonic() - t0
        cpu1 = psutil.cpu_times()
        after = self.procs.snapshot()
        if slices0 is not None:
            slices1 = self.slice_counters()
            if slices1 is not None:
                # Counted router-wide: another job's late settles may release slices meanwhile.
                res["slices"] = {
                    "draws": slices1["draws"] - slices0["draws"],
                    # Draw notes and the NoteSliceDraws round trips that carried them.
                    "notes": slices1["notes"] - slices0["notes"],
                    "note_batches": slices1["note_batches"] - slices0["note_batches"],
                    "events": {
                        k: v - slices0["events"].get(k, 0)
                        for k, v in slices1["events"].items()
                        if v - slices0["events"].get(k, 0)
                    },
                }
        calls = res["ok"] + res["warmup"]["ok"]
        res["procs"] = baseline_mod.own_procs(system, procstats.delta(before, after, calls, wall))
        busy = (sum(cpu1) - sum(cpu0)) - (
            (cpu1.idle - cpu0.idle) + (getattr(cpu1, "iowait", 0) - getattr(cpu0, "iowait", 0))
        )
        total = sum(cpu1) - sum(cpu0)
        ours = sum(p["cpu_s"] for p in res["procs"].values())
        ncpu = psutil.cpu_count() or 1
        res["machine_busy_pct"] = round(100 * busy / total, 1) if total > 0 else None
        res["other_tenants_cores"] = (
            round(max(busy / total * ncpu * wall - ours, 0) / wall, 2) if total > 0 and wall > 0 else None
        )
        res["loadavg"] = round(os.getloadavg()[0], 2)
        res["wall_s"] = round(wall, 3)
        res["system"] = system
        res["job"] = {k: v for k, v in job.items() if k not in ("certs", "headers", "ca")}
        res["job"]["n_certs"] = len(job.get("certs", []))
        # The baseline's entries are in its own ledger (bench/baseline.py): not this run's check.
        if (job["kind"] == "grpc" or job.get("rid_header")) and record and baseline_mod.owner(system) != "base":
            prefix = job["rid_prefix"]
            self.rid_owner[prefix] = (system, frozenset(self.cert_team.get(c[0], "?") for c in job["certs"]))
            exp = self.expected.setdefault(scenario, set())
            bad = self.client_failed.setdefault(scenario, set())
            for sub, part in (("", res), ("w", res["warmup"])):
                failed = set(part["failed_ids"])
                for i in range(part["sent"]):
                    (bad if i in failed else exp).add(f"{prefix}{sub}{i}")
        res.pop("failed_ids", None)
        res["warmup"].pop("failed_ids", None)
        return res

    # ------------------------------------------------------------------ spend check

    def spend_check(self) -> dict[str, Any]:
        """Every request id answered OK has exactly one spend entry, charged to the team of the agent
        cert that made the call; none for the others. Per scenario, and per system within it
        (e.g. ``igw`` and ``igw-percall`` in ``rate``)."""
        import grpc
        from google.protobuf import timestamp_pb2

        from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc

        total_expected = sum(len(v) for v in self.expected.values())
        start = timestamp_pb2.Timestamp()
        start.FromSeconds(int(self.started_at) - 120)
        found: Counter[str] = Counter()
        team_of: dict[str, str] = {}
        with self._operator(self.endpoints["ledger"]) as ch:
            stub = ledger_pb2_grpc.LedgerAdminServiceStub(ch)

            def count() -> int:
                resp = stub.ListSpend(ledger_pb2.ListSpendRequest(start_time=start), timeout=60)
                return sum(t.request_count for t in resp.totals)

            # Settles run in the background after the answer: wait until they stop arriving.
            deadline = time.monotonic() + 60
            last, stable_since = -1, time.monotonic()
            while time.monotonic() < deadline:
                try:
                    n = count()
                except grpc.RpcError as err:
                    self.notes.append(f"ListSpend failed: {err.code().name}")
                    n = -2
                if n != last:
                    last, stable_since = n, time.monotonic()
                elif n >= total_expected or time.monotonic() - stable_since > 5:
                    break
                time.sleep(0.5)
            token = ""
            while True:
                resp = stub.ListSpendEntries(
                    ledger_pb2.ListSpendEntriesRequest(start_time=start, page_size=1000, page_token=token), timeout=120
                )
                for e in resp.entries:
                    if e.request_id.startswith(self.run_id + "."):
                        found[e.request_id] += 1
                        team_of[e.request_id] = e.team
                token = resp.next_page_token
                if not token:
                    break

        def owner(rid: str) -> tuple[str, frozenset[str]]:
            return self.rid_owner.get(rid.rsplit(".", 1)[0] + ".", ("?", frozenset()))

        def check(ids: set[str], mine: dict[str, int], failed: set[str]) -> dict[str, Any]:
            lost = ids - mine.keys()
            dups = [k for k, v in mine.items() if v > 1]
            extra = mine.keys() - ids
            wrong_team = [k for k in mine if team_of.get(k) not in owner(k)[1]]
            return {
                "successes": len(ids),
                "entries": sum(mine.values()),
                "lost": len(lost),
                "duplicated": len(dups),
                "unexpected": len(extra),
                "unexpected_for_client_failures": len(extra & failed),
                "wrong_team": len(wrong_team),
                "examples_lost": sorted(lost)[:5],
                "examples_wrong_team": [f"{k}: {team_of.get(k)}" for k in sorted(wrong_team)[:5]],
                "ok": not lost and not dups and not (extra - failed) and not wrong_team,
            }

        out: dict[str, Any] = {}
        for scen, ids in self.expected.items():
            mine = {k: v for k, v in found.items() if k.split(".")[1] == scen}
            failed = self.client_failed.get(scen, set())
            out[scen] = check(ids, mine, failed)
            systems = sorted({owner(k)[0] for k in ids | mine.keys()})
            if len(systems) > 1:
                out[scen]["systems"] = {
                    s: check(
                        {k for k in ids if owner(k)[0] == s},
                        {k: v for k, v in mine.items() if owner(k)[0] == s},
                        {k for k in failed if owner(k)[0] == s},
                    )
                    for s in systems
                }
        return out


# --------------------------------------------------------------------------- scenarios


def _added(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(a[k] - b[k], 3) for k in ("p50", "p90", "p99", "p99.9") if k in a and k in b}


def _pool(results: list[dict[str, Any]], key: str = "samples_ms") -> dict[str, float]:
    samples: list[float] = []
    for r in results:
        samples += r.get(key, [])
    return percentiles(samples)


def scen_ceiling(rig: Rig) -> dict[str, Any]:
    """The fake's own ceiling: many concurrent callers, as fast as the load generator can go."""
    out: dict[str, Any] = {}
    dur = 1.0 if rig.opts.quick else 4.0
    for conc in (16, 64) if not rig.opts.quick else (16,):
        res = rig.measure(
            "ceiling", "direct", rig.direct_job("d0", "concurrent", concurrency=conc, duration=dur, warmup_s=0.3)
        )
        out[f"c{conc}"] = res
    best = max(out.values(), key=lambda r: r["achieved_rps"])
    rig.log(f"fake ceiling ~{best['achieved_rps']:.0f} calls/s (load generator and fake share the cores)")
    return {"runs": out, "ceiling_rps": best["achieved_rps"]}


def scen_c1(rig: Rig) -> dict[str, Any]:
    """One call in flight, interleaved rounds: direct, igw (many teams), igw with budget slices (one
    team, ``igw-hot-percall``), LiteLLM; fake delay 0 and 20 ms."""
    o = rig.opts
    out: dict[str, Any] = {}
    for fake, n in (("d0", o.c1_n), ("d20", max(o.c1_n // 4, 20))):
        runs: dict[str, list[dict[str, Any]]] = {"direct": [], "igw": [], "igw-hot-percall": []}
        if rig.litellm:
            runs["litellm"] = []
        if rig.baseline:
            runs["base"] = []
        for rnd in range(o.c1_rounds):
            order = list(runs)
            order = order[rnd % len(order) :] + order[: rnd % len(order)]
            for system in order:
                if system == "direct":
                    job = rig.direct_job(fake, "closed", n=n, warmup=10)
                elif system == "igw":
                    job = rig.igw_job(f"bench-{fake}", rig.many_certs, "closed", n=n, warmup=10)
                elif system == "igw-hot-percall":
                    # Slices are for a busy team: one team's calls share its slices.
                    job = rig.igw_job(f"bench-{fake}", rig.hot_percall_certs, "closed", n=n, warmup=10)
                elif system == "base" and rig.baseline:
                    job = rig.baseline.job(f"bench-{fake}", rig.baseline.many_certs, "closed", n=n, warmup=10)
                else:
                    job = rig.litellm_job(f"bench-{fake}", "closed", n=n, warmup=10)
                runs[system].append(rig.measure("c1", system, job))
        pooled = {s: _pool(rs) for s, rs in runs.items()}
        per_round = {s: [r["latency_ms"]["p50"] for r in rs] for s, rs in runs.items()}
        entry: dict[str, Any] = {
            "pooled_ms": pooled,
            "round_p50s_ms": per_round,
            "procs": {s: rs[-1]["procs"] for s, rs in runs.items()},
            "errors": {s: sum(sum(r["errors"].values()) for r in rs) for s, rs in runs.items()},
        }
        entry["added_ms"] = {s: _added(pooled[s], pooled["direct"]) for s in pooled if s != "direct"}
        for rs in runs.values():
            for r in rs:
                r.pop("samples_ms", None)
        entry["runs"] = runs
        out[fake] = entry
        rig.log(f"c1 {fake}: " + ", ".join(f"{s} p50 {p['p50']:.2f} p99 {p['p99']:.2f}" for s, p in pooled.items()))
    return out


def _step_ok(res: dict[str, Any], direct: dict[str, Any] | None) -> tuple[bool, str]:
    errs = sum(res["errors"].values())
    if errs:
        return False, f"{errs} errors {res['errors']}"
    if res["achieved_rps"] < 0.95 * res["offered_rps"]:
        return False, f"achieved {res['achieved_rps']} < 95% of offered"
    if direct is not None:
        added = res["latency_ms"]["p99"] - direct["latency_ms"]["p99"]
        if added > ADDED_P99_BOUND_MS:
            return False, f"added p99 {added:.1f} ms > {ADDED_P99_BOUND_MS:.0f}"
    return True, "ok"


def _ladder(rig: Rig, scenario: str, systems: dict[str, Any], fake: str = "d20") -> dict[str, Any]:
    """Open-loop steps; each step runs every still-passing system once, in rotating order."""
    o = rig.opts
    steps: list[dict[str, Any]] = []
    alive = set(systems)
    max_ok: dict[str, float] = {s: 0.0 for s in systems}
    fails: dict[str, str] = {}
    for k, rate in enumerate(o.ladder):
        if not alive:
            break
        step: dict[str, Any] = {"rate": rate, "results": {}}
        order = ["direct", *sorted(alive)]
        order = order[k % len(order) :] + order[: k % len(order)]
        for system in order:
            job = (
                rig.direct_job(fake, "open", rate=rate, duration=o.step_s, warmup_s=o.warm_s)
                if system == "direct"
                else systems[system](rate)
            )
            step["results"][system] = rig.measure(scenario, system, job)
        for system in sorted(alive):
            # Each system is judged against this step's direct run (or, on a retry, its own).
            direct = step["results"]["direct"]
            res = step["results"][system]
            ok, why = _step_ok(res, direct)
            if not ok:
                # Noisy shared machine: one retry of a failing step (interleaved with direct again).
                again = rig.measure(scenario, system, systems[system](rate))
                d2 = rig.measure(
                    scenario, "direct", rig.direct_job(fake, "open", rate=rate, duration=o.step_s, warmup_s=o.warm_s)
                )
                ok2, why2 = _step_ok(again, d2)
                step.setdefault("retries", {})[system] = {"result": again, "direct": d2, "ok": ok2, "why": why2}
                if ok2:
                    res, ok, why = again, True, "ok on retry"
                    step["results"][system] = again
                    direct = d2
            res["pass"] = ok
            res["why"] = why
            res["added_ms"] = _added(res["latency_ms"], direct["latency_ms"])
            if ok:
                max_ok[system] = max(max_ok[system], float(rate))
            else:
                alive.discard(system)
                fails[system] = f"at {rate}/s: {why}"
        rig.log(
            f"{scenario} {rate}/s: "
            + ", ".join(
                f"{s} p50 {r['latency_ms'].get('p50', float('nan')):.1f} p99 {r['latency_ms'].get('p99', float('nan')):.1f}"
                f" ach {r.get('achieved_rps', 0):.0f} err {sum(r['errors'].values())}"
                for s, r in step["results"].items()
            )
        )
        steps.append(step)
    return {
        "steps": steps,
        "max_sustained_rps": max_ok,
        "stopped": fails,
        "fake": fake,
        "bound_added_p99_ms": ADDED_P99_BOUND_MS,
    }


def scen_rate(rig: Rig) -> dict[str, Any]:
    """Many teams: igw (per-call holds, the default), igw with budget slices (opt-in; the same job
    through the slices teams), LiteLLM; interleaved per step."""
    systems: dict[str, Any] = {
        "igw": lambda rate: rig.igw_job(
            "bench-d20", rig.many_certs, "open", rate=rate, duration=rig.opts.step_s, warmup_s=rig.opts.warm_s
        ),
        "igw-percall": lambda rate: rig.igw_job(
            "bench-d20", rig.percall_certs, "open", rate=rate, duration=rig.opts.step_s, warmup_s=rig.opts.warm_s
        ),
    }
    if rig.litellm:
        systems["litellm"] = lambda rate: rig.litellm_job(
            "bench-d20", "open", rate=rate, duration=rig.opts.step_s, warmup_s=rig.opts.warm_s
        )
    if rig.baseline:
        base = rig.baseline
        systems["base"] = lambda rate: base.job(
            "bench-d20", base.many_certs, "open", rate=rate, duration=rig.opts.step_s, warmup_s=rig.opts.warm_s
        )
    return _ladder(rig, "rate", systems)


def scen_rate_litellm_default(rig: Rig) -> dict[str, Any]:
    """The many-teams ladder for LiteLLM at its own default worker count (one per logical CPU).

    The main ladder runs LiteLLM with ``--litellm-workers`` (1 by default) while igw spreads
    over every core; this one gives LiteLLM the whole machine too, so the ratio is quoted both
    ways. It restarts the proxy, so it runs after every other LiteLLM scenario.
    """
    if rig.litellm is None:
        return {"skipped": "LiteLLM not running (--no-litellm)"}
    workers = os.cpu_count() or 1
    if workers == rig.opts.litellm_workers:
        return {"skipped": f"the main ladder already ran LiteLLM with {workers} workers", "workers": workers}
    rig.start_litellm(workers)
    out = _ladder(rig, "rate-litellm-default", {
        "litellm": lambda rate: rig.litellm_job(
            "bench-d20", "open", rate=rate, duration=rig.opts.step_s, warmup_s=rig.opts.warm_s
        ),
    })
    out["workers"] = workers
    out["litellm"] = rig.litellm.info()
    return out


def scen_hot(rig: Rig) -> dict[str, Any]:
    """One hot team (four agents): per-call holds vs budget slices (opt-in), interleaved per step."""
    systems = {
        "igw-hot": lambda rate: rig.igw_job(
            "bench-d20", rig.hot_certs, "open", rate=rate, duration=rig.opts.step_s, warmup_s=rig.opts.warm_s
        ),
        "igw-hot-percall": lambda rate: rig.igw_job(
            "bench-d20", rig.hot_percall_certs, "open", rate=rate, duration=rig.opts.step_s, warmup_s=rig.opts.warm_s
        ),
    }
    if rig.baseline:
        base = rig.baseline
        systems["base-hot"] = lambda rate: base.job(
            "bench-d20", base.hot_certs, "open", rate=rate, duration=rig.opts.step_s, warmup_s=rig.opts.warm_s
        )
    return _ladder(rig, "hot", systems)


def scen_limit(rig: Rig) -> dict[str, Any]:
    """One team at the defaults (adaptive slices) and one with per-call holds, each driven to a limit.
    First 0.6 LIMIT_CALLS calls far from any limit with several in flight (the 20 ms fake at 100
    calls/s, so the defaults draw slices); then, with those slices still open, the limit is set to
    the spend so far plus the other 0.4 LIMIT_CALLS calls' spend and half a call more, and the team
    is called one at a time (10 calls/s) 1.5 times that many calls. The defaults must never
    overspend and must be refused no earlier than per-call holds (as many calls served near the
    limit); the defaults' slice draws in the first phase are reported (zero would mean the check
    exercised per-call holds only)."""
    from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc

    def budget(stub: Any, team: str) -> Any:
        (b,) = stub.GetBudget(ledger_pb2.GetBudgetRequest(team=team), timeout=30).budgets
        return b

    def settled(stub: Any, team: str) -> Any:
        deadline = time.monotonic() + 30
        while True:
            b = budget(stub, team)
            if (b.held_nanos == 0 and b.spent_nanos > 0) or time.monotonic() > deadline:
                return b
            time.sleep(0.1)

    calls = 20 if rig.opts.quick else LIMIT_CALLS
    out: dict[str, Any] = {"limit_calls": calls}
    with rig._operator(rig.endpoints["ledger"]) as ch:
        stub = ledger_pb2_grpc.LedgerServiceStub(ch)
        admin = ledger_pb2_grpc.LedgerAdminServiceStub(ch)
        # One call's cost, from a probe through the per-call team (its budget is still huge).
        rig.measure("limit", "igw-percall",
                    rig.igw_job("bench-d0", rig.limit_certs[LIMIT_PERCALL_TEAM], "closed", n=1, warmup=0))
        cost = settled(stub, LIMIT_PERCALL_TEAM).spent_nanos
        out["call_cost_nanos"] = cost
        for team, system in ((LIMIT_TEAM, "igw"), (LIMIT_PERCALL_TEAM, "igw-percall")):
            # Far from the limit (the team's budget is still huge): several calls in flight (100/s
            # against the 20 ms fake, same model price as the 0 ms one), so a team at the defaults is
            # busy and draws slices, which stay open into the next phase.
            far = int(calls * 0.6)
            busy = rig.measure("limit", system, rig.igw_job(
                "bench-d20", rig.limit_certs[team], "open", rate=100, duration=far / 100, warmup_s=0))
            time.sleep(1.0)  # settles are sent in the background (within ~30 ms), sliced or not
            near = calls - far
            limit = budget(stub, team).spent_nanos + near * cost + cost // 2
            admin.SetBudget(ledger_pb2.SetBudgetRequest(team=team, window=ledger_pb2.BUDGET_WINDOW_TOTAL,
                                                        limit_nanos=limit), timeout=30)
            # Near the limit: one call in flight, 100 ms apart: each call's settle lands before the
            # next call asks, so both kinds of hold see the same spend; the defaults' open slices
            # are given back at the first refusal, so they refuse exactly where per-call holds do.
            res = rig.measure("limit", system, rig.igw_job(
                "bench-d0", rig.limit_certs[team], "open", rate=10, duration=near * 1.5 / 10, warmup_s=0))
            b = settled(stub, team)
            errors = dict(res["errors"])
            for k, v in busy["errors"].items():
                errors[k] = errors.get(k, 0) + v
            out[system] = {
                "served": res["ok"], "served_busy": busy["ok"], "near_calls": near,
                "refused": errors.get("RESOURCE_EXHAUSTED", 0),
                "other_errors": {k: v for k, v in errors.items() if k != "RESOURCE_EXHAUSTED"},
                "limit_nanos": limit, "spent_nanos": b.spent_nanos, "held_nanos": b.held_nanos,
                "overspent": b.spent_nanos + b.held_nanos > limit,
                "slices_busy": busy.get("slices"), "slices": res.get("slices"),
            }
            # The team's budget goes back to huge for whatever runs next.
            admin.SetBudget(ledger_pb2.SetBudgetRequest(team=team, window=ledger_pb2.BUDGET_WINDOW_TOTAL,
                                                        limit_nanos=10**15), timeout=30)
    d, p = out["igw"], out["igw-percall"]
    out["ok"] = (not d["overspent"] and not p["overspent"] and d["served"] >= p["served"] > 0
                 and not d["other_errors"] and not p["other_errors"])
    draws = (d.get("slices_busy") or {}).get("draws", 0)
    out["slice_draws_busy"] = draws
    rig.log(f"limit: defaults served {d['served']} refused {d['refused']} (slice draws far from the limit: "
            f"{draws}); per-call served {p['served']} refused {p['refused']}; ok {out['ok']}")
    return out


def scen_stream(rig: Rig) -> dict[str, Any]:
    """Added time to first token at one call in flight: igw GenerateStream vs SSE straight to the fake."""
    o = rig.opts
    n = max(o.c1_n // 2, 20)
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "igw": []}
    if rig.litellm:
        runs["litellm"] = []
    for rnd in range(o.c1_rounds):
        order = list(runs)
        order = order[rnd % len(order) :] + order[: rnd % len(order)]
        for system in order:
            if system == "direct":
                job = rig.direct_job("d0", "closed", n=n, warmup=5, stream=True)
            elif system == "igw":
                job = rig.igw_job("bench-d0", rig.many_certs, "closed", n=n, warmup=5, stream=True)
            else:
                job = rig.litellm_job("bench-d0", "closed", n=n, warmup=5, stream=True)
            runs[system].append(rig.measure("stream", system, job))
    ttft = {s: _pool(rs, "ttft_samples_ms") for s, rs in runs.items()}
    total = {s: _pool(rs) for s, rs in runs.items()}
    for rs in runs.values():
        for r in rs:
            r.pop("samples_ms", None)
            r.pop("ttft_samples_ms", None)
    out = {
        "ttft_ms": ttft,
        "total_ms": total,
        "added_ttft_ms": {s: _added(ttft[s], ttft["direct"]) for s in ttft if s != "direct"},
        "errors": {s: sum(sum(r["errors"].values()) for r in rs) for s, rs in runs.items()},
        "runs": runs,
    }
    # Streams under load: one open-loop rate.
    rate = 20 if o.quick else 100
    load: dict[str, Any] = {}
    load["direct"] = rig.measure(
        "stream", "direct", rig.direct_job("d0", "open", rate=rate, duration=o.step_s, warmup_s=o.warm_s, stream=True)
    )
    load["igw"] = rig.measure(
        "stream",
        "igw",
        rig.igw_job("bench-d0", rig.many_certs, "open", rate=rate, duration=o.step_s, warmup_s=o.warm_s, stream=True),
    )
    out["open_loop"] = {"rate": rate, "results": load}
    rig.log("stream ttft p50: " + ", ".join(f"{s} {p.get('p50', float('nan')):.2f}" for s, p in ttft.items()))
    return out


def scen_fallback(rig: Rig) -> dict[str, Any]:
    """Primary answers 429 to 20 % of calls; the router falls back to a healthy fake."""
    o = rig.opts
    n = o.c1_n
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "igw": [], "igw-fallback": []}
    for _ in range(o.c1_rounds):
        runs["direct"].append(rig.measure("fallback", "direct", rig.direct_job("d0", "closed", n=n // 2, warmup=5)))
        runs["igw"].append(
            rig.measure("fallback", "igw", rig.igw_job("bench-d0", rig.many_certs, "closed", n=n // 2, warmup=5))
        )
        runs["igw-fallback"].append(
            rig.measure(
                "fallback",
                "igw-fallback",
                rig.igw_job("bench-fallback", rig.many_certs, "closed", n=n, warmup=5, by_provider=True),
            )
        )
    pooled = {s: _pool(rs) for s, rs in runs.items()}
    by_provider: dict[str, list[float]] = {}
    for r in runs["igw-fallback"]:
        for prov, p in r.get("by_provider", {}).items():
            by_provider.setdefault(prov, []).append(p.get("p50", 0))
    for rs in runs.values():
        for r in rs:
            r.pop("samples_ms", None)
    out: dict[str, Any] = {
        "c1_pooled_ms": pooled,
        "c1_added_vs_direct_ms": {s: _added(pooled[s], pooled["direct"]) for s in pooled if s != "direct"},
        "c1_served_by": [r.get("by_provider", {}) for r in runs["igw-fallback"]],
        "errors": {s: sum(sum(r["errors"].values()) for r in rs) for s, rs in runs.items()},
        "runs": runs,
    }
    load = []
    for rate in (20,) if o.quick else (50, 100, 200):
        d = rig.measure(
            "fallback", "direct", rig.direct_job("d0", "open", rate=rate, duration=o.step_s, warmup_s=o.warm_s)
        )
        r = rig.measure(
            "fallback",
            "igw-fallback",
            rig.igw_job(
                "bench-fallback",
                rig.many_certs,
                "open",
                rate=rate,
                duration=o.step_s,
                warmup_s=o.warm_s,
                by_provider=True,
            ),
        )
        r["added_ms"] = _added(r["latency_ms"], d["latency_ms"])
        load.append({"rate": rate, "direct": d, "igw-fallback": r})
    out["open_loop"] = load
    rig.log(
        f"fallback c1 p50 {pooled['igw-fallback'].get('p50', float('nan')):.2f} ms vs igw "
        f"{pooled['igw'].get('p50', float('nan')):.2f} vs direct {pooled['direct'].get('p50', float('nan')):.2f}"
    )
    return out


# --------------------------------------------------------------------------- profiles


def _pyspy() -> str | None:
    cand = Path(sys.executable).parent / "py-spy"
    if cand.exists():
        return str(cand)
    return shutil.which("py-spy")


def _parse_collapsed(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's ``--format raw`` output."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n

    def table(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "samples": n, "pct": round(100 * n / total, 1)} for f, n in c.most_common(top)]

    return {"total_samples": total, "self": table(self_c), "inclusive": table(incl)}


def scen_profile(rig: Rig, rate: float) -> dict[str, Any]:
    """py-spy on router, ledger and keyvault while igw runs at ``rate`` (many teams)."""
    exe = _pyspy()
    if exe is None:
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    dur = 3 if rig.opts.quick else 10
    # --native shows where the time goes inside C extensions (grpc's Cython core, uvloop, psycopg's
    # libpq wrapper) instead of lumping it into the frame that called them; it pauses the process to
    # sample, so the load's latency during profiling is not a benchmark number.
    native = os.environ.get("IGW_BENCH_PYSPY_NATIVE", "0") == "1"
    out_dir = rig.state / "profiles"
    out_dir.mkdir(exist_ok=True)
    spies = {}
    for svc in ("router", "ledger", "keyvault"):
        pid = rig.endpoints["pids"][svc]
        raw = out_dir / f"{svc}.txt"
        spies[svc] = (
            subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(dur),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    *(["--native"] if native else ["--nonblocking"]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(out_dir / f"{svc}.err", "ab"),
            ),
            raw,
        )
    time.sleep(0.5)
    load = rig.measure(
        "profile", "igw", rig.igw_job("bench-d20", rig.many_certs, "open", rate=rate, duration=dur + 1, warmup_s=0)
    )
    out: dict[str, Any] = {"rate": rate, "duration_s": dur, "native": native, "load": load, "services": {}}
    for svc, (proc, raw) in spies.items():
        try:
            proc.wait(dur + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if raw.exists():
            out["services"][svc] = _parse_collapsed(raw)
            keep = ROOT / "bench" / "results" / f"profile-{svc}.txt"
            try:
                shutil.copyfile(raw, keep)
            except OSError:
                pass
        else:
            err = (out_dir / f"{svc}.err").read_text(errors="replace")[-500:]
            out["services"][svc] = {"error": err}
    return out


# --------------------------------------------------------------------------- run all


# --------------------------------------------------------------------------- the HTTPS edge


EDGE_SYSTEMS = ("direct", "igw", "igw-edge", "litellm")


def edge_job(rig: Rig, alias: str, certs: list[list[str]], mode: str, **kw: Any) -> dict[str, Any]:
    """A load-generator job against the edge (``POST /v1/chat/completions`` over mTLS)."""
    return {
        "kind": "http",
        "key": f"edge-{len(certs)}-{certs[0][0]}",
        "url": rig.endpoints["openai_base_url"] + "/chat/completions",
        "ca": rig.endpoints["ca"],
        "certs": certs,
        "rid_header": "x-igw-request-id",
        "model": alias,
        "mode": mode,
        **kw,
    }


def _edge_or_other_job(rig: Rig, system: str, fake: str, mode: str, **kw: Any) -> dict[str, Any]:
    if system == "direct":
        return rig.direct_job(fake, mode, **kw)
    if system == "igw":
        return rig.igw_job(f"bench-{fake}", rig.many_certs, mode, **kw)
    if system == "igw-edge":
        return edge_job(rig, f"bench-{fake}", rig.many_certs, mode, **kw)
    return rig.litellm_job(f"bench-{fake}", mode, **kw)


def scen_edge(rig: Rig) -> dict[str, Any]:
    """One call in flight (interleaved rounds), then the open-loop ladder: igw, igw-edge, LiteLLM."""
    o = rig.opts
    systems = [s for s in EDGE_SYSTEMS if s != "litellm" or rig.litellm]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for rnd in range(o.c1_rounds):
        order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
        for system in order:
            runs[system].append(rig.measure("edge", system, _edge_or_other_job(rig, system, "d0", "closed", n=o.c1_n, warmup=10)))
    pooled = {s: _pool(rs) for s, rs in runs.items()}
    for rs in runs.values():
        for r in rs:
            r.pop("samples_ms", None)
    c1 = {
        "pooled_ms": pooled,
        "added_ms": {s: _added(pooled[s], pooled["direct"]) for s in pooled if s != "direct"},
        "errors": {s: sum(sum(r["errors"].values()) for r in rs) for s, rs in runs.items()},
        "procs": {s: rs[-1]["procs"] for s, rs in runs.items()},
        "runs": runs,
    }
    rig.log("edge c1: " + ", ".join(f"{s} p50 {p['p50']:.2f} p99 {p['p99']:.2f}" for s, p in pooled.items()))
    ladder_systems = {
        s: (lambda rate, s=s: _edge_or_other_job(rig, s, "d20", "open", rate=rate, duration=o.step_s, warmup_s=o.warm_s))
        for s in systems if s != "direct"
    }
    rate = _ladder(rig, "edge", ladder_systems)
    return {"c1": c1, "rate": rate}


def run(opts: Options) -> dict[str, Any]:
    """Starts the rig, runs the chosen scenarios, checks spend, stops everything. Returns raw results."""
    state = Path(tempfile.mkdtemp(prefix="igw-bench-"))
    run_id = "b" + time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)
    rig = Rig(opts, state, run_id, "sk-bench-" + secrets.token_hex(12))
    results: dict[str, Any] = {
        "run_id": run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": opts.quick,
        "machine": procstats.machine_info(),
        "options": {
            "scenarios": list(opts.scenarios),
            "litellm": opts.litellm,
            "litellm_workers": opts.litellm_workers,
            "pause_others": opts.pause_others,
            "ladder": list(opts.ladder),
            "step_s": opts.step_s,
            "warmup_s": opts.warm_s,
            "c1_n": opts.c1_n,
            "c1_rounds": opts.c1_rounds,
            "teams": opts.teams,
        },
        "command": " ".join(["python -m bench", *sys.argv[1:]]) if sys.argv and "bench" in sys.argv[0] else "",
        "scenarios": {},
    }
    t_start = time.monotonic()
    try:
        rig.start()
        results["rig"] = {
            "fakes": {n: {"port": f.port, "delay_ms": f.delay_ms, "fault": f.fault} for n, f in rig.fakes.items()},
            "routing_config": (state / "bench-router.yaml").read_text(),
            "litellm": rig.litellm.info() if rig.litellm else None,
            "baseline": rig.baseline.info() if rig.baseline else None,
            "postgres": "embedded (igw_dev.pg), durable: fsync on, synchronous_commit on",
        }
        runners = {
            "ceiling": scen_ceiling,
            "c1": scen_c1,
            "rate": scen_rate,
            "hot": scen_hot,
            "limit": scen_limit,
            "stream": scen_stream,
            "fallback": scen_fallback,
            "rate-litellm-default": scen_rate_litellm_default,
            "edge": scen_edge,
        }
        for name in opts.scenarios:
            if name == "profile" or name not in runners:
                continue
            rig.log(f"scenario {name}")
            t = time.monotonic()
            try:
                results["scenarios"][name] = runners[name](rig)
            except Exception as err:
                rig.log(f"scenario {name} failed: {err!r}")
                results["scenarios"][name] = {"error": repr(err)}
            results["scenarios"].get(name, {})["elapsed_s"] = round(time.monotonic() - t, 1)
        rig.log("spend check")
        results["spend_check"] = rig.spend_check()
        if "profile" in opts.scenarios and opts.profile:
            rate_res = results["scenarios"].get("rate", {})
            best = rate_res.get("max_sustained_rps", {}).get("igw", 0.0) if isinstance(rate_res, dict) else 0.0
            rate = max(best * 0.8, 20.0) if best else (20.0 if opts.quick else 150.0)
            rig.log(f"profiling at {rate:.0f}/s")
            results["profile"] = scen_profile(rig, rate)
        results["rss_end"] = rig.procs.snapshot()
        results["notes"] = rig.notes
    finally:
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        try:
            rig.stop()
        except Exception as err:
            rig.log(f"while stopping: {err!r}")
    return results
