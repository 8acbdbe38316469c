"""The ``edge`` scenario: igw's OpenAI-compatible HTTPS edge next to its gRPC path and LiteLLM.

Both the edge and LiteLLM are HTTP/JSON with the same request body, so this is the comparison
a user makes first. The edge runs the same call as gRPC (mTLS with one agent certificate per
team, a vault lease, a ledger hold and an exact settle); its request ids go in the
``x-igw-request-id`` header so the spend check holds it to one entry per answered call.

Two parts, all against the same fakes:

* ``c1``: one call in flight, interleaved rounds: direct, igw (gRPC), igw-edge, LiteLLM
  (fake d0: pure overhead);
* ``rate``: the open-loop ladder (fake d20) for igw, igw-edge and LiteLLM.
"""

from __future__ import annotations

from typing import Any

from bench.scenarios import Rig, _added, _ladder, _pool

SYSTEMS = ("direct", "igw", "igw-edge", "litellm")


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


def _job(rig: Rig, system: str, fake: str, mode: str, **kw: Any) -> dict[str, Any]:
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
    systems = [s for s in SYSTEMS if s != "litellm" or rig.litellm]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for rnd in range(o.c1_rounds):
        order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
        for system in order:
            runs[system].append(rig.measure("edge", system, _job(rig, system, "d0", "closed", n=o.c1_n, warmup=10)))
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
        s: (lambda rate, s=s: _job(rig, s, "d20", "open", rate=rate, duration=o.step_s, warmup_s=o.warm_s))
        for s in systems if s != "direct"
    }
    rate = _ladder(rig, "edge", ladder_systems)
    return {"c1": c1, "rate": rate}
