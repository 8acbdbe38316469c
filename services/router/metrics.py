"""The router's Prometheus metrics. Labels are bounded: provider, model and deployment
come from the routing config, team from certificates, reason from fixed enums."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.server_metrics import LATENCY_BUCKETS


@dataclass
class RouterMetrics:
    """Every metric the router exports."""

    registry: CollectorRegistry
    upstream_seconds: Histogram = field(init=False)
    ttft_seconds: Histogram = field(init=False)
    tokens: Counter = field(init=False)
    cost_nanos: Counter = field(init=False)
    calls: Counter = field(init=False)
    attempts: Counter = field(init=False)
    fallbacks: Counter = field(init=False)
    retries: Counter = field(init=False)
    breaker_state: Gauge = field(init=False)
    budget_denials: Counter = field(init=False)
    in_flight: Gauge = field(init=False)
    overload_rejections: Counter = field(init=False)
    settle_retries: Counter = field(init=False)
    settles_unconfirmed: Counter = field(init=False)
    slice_draw_notes: Counter = field(init=False)
    slice_draw_note_retries: Counter = field(init=False)
    slice_draw_note_batches: Counter = field(init=False)
    config_info: Gauge = field(init=False)
    settles_pending: Gauge = field(init=False)
    config_reloads: Counter = field(init=False)
    replicas: Gauge = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.upstream_seconds = Histogram(
            "igw_router_upstream_seconds", "Upstream call duration by provider and model.",
            ["provider", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram(
            "igw_router_time_to_first_token_seconds", "Time to the first streamed token.",
            ["provider", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(
            "igw_router_tokens", "Tokens by provider, model and kind (input, output, cached_input).",
            ["provider", "model", "kind"], registry=r)
        self.cost_nanos = Counter(
            "igw_router_cost_nanodollars", "Cost of served calls, in nano-dollars.",
            ["provider", "model", "team"], registry=r)
        self.calls = Counter(
            "igw_router_calls", "Agent calls by alias and result code.", ["alias", "code"], registry=r)
        self.attempts = Counter(
            "igw_router_attempts", "Upstream attempts by deployment and outcome.",
            ["deployment", "outcome"], registry=r)
        self.fallbacks = Counter(
            "igw_router_fallbacks", "Moves to another deployment, by reason.", ["reason"], registry=r)
        self.retries = Counter(
            "igw_router_retries", "Retries of the same deployment, by reason.", ["reason"], registry=r)
        self.breaker_state = Gauge(
            "igw_router_breaker_state", "Breaker state per deployment: 0 closed, 1 open, 2 half-open.",
            ["deployment"], registry=r)
        self.budget_denials = Counter(
            "igw_router_budget_denials", "Calls refused for budget, by team.", ["team"], registry=r)
        self.in_flight = Gauge("igw_router_in_flight_calls", "Agent calls in flight.", registry=r)
        self.overload_rejections = Counter(
            "igw_router_overload_rejections", "Calls refused because max_in_flight was reached.", registry=r)
        self.request_releases = Counter(
            "igw_router_request_releases",
            "Calls that ended early with a Reserve answer outstanding, released by request id, by outcome "
            "(sent, unacknowledged).", ["outcome"], registry=r)
        self.lease_ends = Counter(
            "igw_router_lease_ends", "Vault leases ended (EndLease), by how: used, returned, unacknowledged.",
            ["end"], registry=r)
        self.settle_retries = Counter(
            "igw_router_settle_retries", "Settle calls retried before the ledger acknowledged.", registry=r)
        self.settles_unconfirmed = Counter(
            "igw_router_settles_unconfirmed",
            "Calls drawn from a budget slice answered before the ledger recorded their draw (or acknowledged "
            "their settle): both are still retried in the background; if neither lands, the slice is captured "
            "whole.", registry=r)
        self.slice_draw_notes = Counter(
            "igw_router_slice_draw_notes",
            "Slice draw notes (NoteSliceDraws items) by kind (draw, withdrawal) and result (acknowledged, "
            "refused, unacknowledged, unsupported: the ledger has no NoteSliceDraws).", ["kind", "result"], registry=r)
        self.slice_draw_note_retries = Counter(
            "igw_router_slice_draw_note_retries", "Slice draw notes sent again after a fault.", registry=r)
        self.slice_draw_note_batches = Counter(
            "igw_router_slice_draw_note_batches",
            "NoteSliceDraws round trips sent (notes per round trip: igw_router_slice_draw_notes_total over this).",
            registry=r)
        self.slices = Counter(
            "igw_router_budget_slices", "Budget slices by event (acquired, denied, failed, released, kept).",
            ["event"], registry=r)
        self.slice_draws = Counter(
            "igw_router_slice_draws", "Call holds placed locally from a budget slice (no Reserve).", registry=r)
        self.settles_pending = Gauge(
            "igw_router_settles_pending", "Settles queued or in flight, not yet acknowledged by the ledger.",
            registry=r)
        self.config_info = Gauge(
            "igw_router_config_info", "The active routing config (value 1), by digest.", ["sha256"], registry=r)
        self.config_reloads = Counter(
            "igw_router_config_reloads", "Config reloads by result.", ["result"], registry=r)
        self.replicas = Gauge(
            "igw_router_healthy_replicas", "Ledger and vault replicas this router sees SERVING, by service.",
            ["service"], registry=r)
