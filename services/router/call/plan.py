"""The call's rules: which deployments, in what order, what each failure means, and the final error.

- Order: the alias's candidates by its strategy (priority, cheapest, latency, weighted), minus
  those that cannot take the request's inputs (tools, images).
- Each candidate is tried once per round while its breaker lets it; rounds repeat with backoff
  (retry-after honoured up to a cap) until ``retries.max_attempts`` or the deadline.
- A failure's kind decides what happens next: bad request and content refusal go straight back
  to the agent; context too long leaves only candidates with a larger window; auth failure,
  refused redirect and a missing credential skip that deployment; the rest (rate limited,
  overloaded, server error, timeout, connect error, protocol error) feed the breaker and fall back.
- When every candidate failed, :func:`final_error` picks the status by cause.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping

from services.common import errors as E
from services.router.breaker import Breaker
from services.router.call.domain import Attempt, CallRequest, Outcome
from services.router.call.ports import Clock, Price
from services.router.metrics import RouterMetrics
from services.router.providers.domain import Timeouts
from services.router.providers.errors import ErrorKind, ProviderError
from services.router.routing import Alias, Deployment, RoutingConfig

OUTCOME = {
    ErrorKind.RATE_LIMITED: Outcome.RATE_LIMITED,
    ErrorKind.OVERLOADED: Outcome.OVERLOADED,
    ErrorKind.SERVER_ERROR: Outcome.SERVER_ERROR,
    ErrorKind.TIMEOUT: Outcome.TIMEOUT,
    ErrorKind.CONNECT_ERROR: Outcome.CONNECT_ERROR,
    ErrorKind.CONTEXT_TOO_LONG: Outcome.CONTEXT_TOO_LONG,
    ErrorKind.CONTENT_REFUSED: Outcome.CONTENT_REFUSED,
    ErrorKind.BAD_REQUEST: Outcome.BAD_REQUEST,
    ErrorKind.AUTH_FAILED: Outcome.AUTH_FAILED,
    ErrorKind.PROTOCOL_ERROR: Outcome.PROTOCOL_ERROR,
    ErrorKind.REDIRECT_REFUSED: Outcome.PROTOCOL_ERROR,
}
# Errors that go straight back to the agent: another deployment would say the same.
_TERMINAL = {
    ErrorKind.BAD_REQUEST: ("UPSTREAM_BAD_REQUEST", E.InvalidArgument),
    ErrorKind.CONTENT_REFUSED: ("CONTENT_REFUSED", E.FailedPrecondition),
}
# Deployment-specific failures: skip this deployment, try the others, do not feed the breaker.
_SKIP = {ErrorKind.AUTH_FAILED, ErrorKind.REDIRECT_REFUSED}
Ticket = bool | str  # a breaker's answer: True (a normal call) or "probe" (the half-open probe)


def resolve_alias(cfg: RoutingConfig, team: str, model: str) -> Alias:
    """The alias ``model`` names, if ``team`` may use it."""
    alias = cfg.aliases.get(model)
    if alias is None:
        raise E.NotFound("UNKNOWN_MODEL", "no such model alias", {"model": model[:128]})
    if not alias.allows(team):
        raise E.PermissionDenied("MODEL_NOT_ALLOWED", "your team may not use this model", {"model": model})
    return alias


def order(
    alias: Alias, cfg: RoutingConfig, prices: Mapping[str, Price], breakers: Mapping[str, Breaker],
) -> list[Deployment]:
    """The alias's candidates in the order its strategy gives."""
    deps = [cfg.deployments[c] for c in alias.candidates]
    if alias.strategy == "cheapest":

        def unit_cost(d: Deployment) -> int:
            p = prices.get(d.price)
            return (p.input_per_mtok_nanos + p.output_per_mtok_nanos) if p else 1 << 62

        deps.sort(key=unit_cost)
    elif alias.strategy == "latency":
        # Unobserved deployments first (explore), then by smoothed first-byte latency.
        def lat(d: Deployment) -> float:
            ewma = breakers[d.name].latency_ewma_s
            return -1.0 if ewma is None else ewma

        deps.sort(key=lat)
    elif alias.strategy == "weighted":
        pool = [d for d in deps if d.weight > 0]
        ordered: list[Deployment] = []
        while pool:
            pick = random.choices(pool, weights=[d.weight for d in pool])[0]
            ordered.append(pick)
            pool.remove(pick)
        deps = ordered
    return deps


class Plan:
    """One call's attempts: which deployment next, and the bookkeeping of each attempt's end."""

    def __init__(
        self, call: CallRequest, breakers: Mapping[str, Breaker], metrics: RouterMetrics, clock: Clock,
        deadline: float | None,
    ) -> None:
        self.call = call
        self.cfg = call.cfg
        self.breakers = breakers
        self.metrics = metrics
        self.clock = clock
        self.deadline = deadline
        self.log: list[Attempt] = []
        self.excluded: set[str] = set()
        self.verdict: ProviderError | None = None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock.monotonic()

    def rpc_timeout(self) -> float:
        """How long a ledger or vault call of this attempt may take."""
        rem = self.remaining()
        return 5.0 if rem is None else max(min(rem, 5.0), 0.001)

    def timeouts(self, probe: bool) -> Timeouts:
        """The provider call's timeouts: the config's, cut by the probe timeout and the deadline."""
        t = self.cfg.timeouts
        total = t.total_ms / 1000
        if probe:
            total = min(total, self.cfg.breaker.probe_timeout_ms / 1000)
        remaining = self.remaining()
        if remaining is not None:
            total = min(total, max(remaining - 0.05, 0.001))
        return Timeouts(
            connect_s=min(t.connect_ms / 1000, total), first_byte_s=min(t.first_byte_ms / 1000, total),
            idle_s=t.idle_ms / 1000, total_s=total,
        )

    def add(
        self, dep: Deployment, outcome: Outcome, t0: float, err: ProviderError | None = None, cause: str = "",
    ) -> None:
        """Logs one attempt (``t0``: when it started, on the clock's perf counter)."""
        att = Attempt(dep.name, dep.provider, outcome, int((self.clock.perf_counter() - t0) * 1e9), cause=cause)
        if err is not None:
            att.http_status = err.status_code or 0
            if err.retry_after_s is not None:
                att.retry_after_ns = int(err.retry_after_s * 1e9)
            att.cause = cause or err.kind.value
        self.log.append(att)

    async def attempts(self, prices: Mapping[str, Price]) -> AsyncIterator[tuple[int, Deployment, Ticket]]:
        """Yields (attempt number, deployment, breaker ticket) in order, with backoff between rounds.

        The caller records each attempt's verdict in ``self.verdict`` before resuming.
        """
        cfg, prep, metrics = self.cfg, self.call.prep, self.metrics
        deps = order(self.call.alias, cfg, prices, self.breakers)
        deps = [d for d in deps if (not prep.has_tools or d.supports_tools)
                and (not prep.has_images or d.supports_images)]
        if not deps:
            raise E.FailedPrecondition("NO_CAPABLE_DEPLOYMENT", "no deployment of this model takes these inputs")
        attempt = 0
        backoff = cfg.retries.backoff_initial_ms / 1000
        skipped: set[str] = set()
        breaker_logged: set[str] = set()
        while attempt < cfg.retries.max_attempts:
            progressed = False
            wait_hint = 0.0
            last_kind = "unknown"
            for dep in deps:
                if attempt >= cfg.retries.max_attempts:
                    break
                if dep.name in skipped or dep.name in self.excluded:
                    continue
                ticket = self.breakers[dep.name].try_acquire()
                if not ticket:
                    if dep.name not in breaker_logged:
                        breaker_logged.add(dep.name)
                        self.add(dep, Outcome.BREAKER_OPEN, self.clock.perf_counter(), cause="breaker_open")
                        metrics.attempts.labels(dep.name, "breaker_open").inc()
                    continue
                rem = self.remaining()
                if rem is not None and rem <= 0:
                    return
                attempt += 1
                progressed = True
                self.verdict = None
                yield attempt, dep, ticket
                verdict = self.verdict
                if verdict is not None:
                    last_kind = verdict.kind.value
                    if verdict.kind in _SKIP:
                        skipped.add(dep.name)
                    if verdict.retry_after_s:
                        wait_hint = max(wait_hint, verdict.retry_after_s)
            if not progressed:
                return
            # Another round over the same deployments: back off (retry-after honoured up to a cap).
            wait = min(max(backoff, wait_hint), cfg.retries.retry_after_cap_ms / 1000)
            wait = wait * (0.5 + random.random() / 2) if not wait_hint else wait
            if self.deadline is not None and self.clock.monotonic() + wait >= self.deadline:
                return
            if attempt < cfg.retries.max_attempts:
                metrics.retries.labels(last_kind).inc()  # why the round before failed
                await self.clock.sleep(wait)
            backoff = min(backoff * 2, cfg.retries.backoff_max_ms / 1000)

    def failed(self, dep: Deployment, ticket: Ticket, err: ProviderError, t0: float) -> None:
        """Bookkeeping for a failed provider call; raises for errors that go straight back."""
        self.verdict = err
        metrics = self.metrics
        self.add(dep, OUTCOME.get(err.kind, Outcome.SERVER_ERROR), t0, err)
        metrics.attempts.labels(dep.name, err.kind.value).inc()
        breaker = self.breakers[dep.name]
        # A timeout the agent's own deadline imposed says nothing about the deployment's health.
        cut_by_deadline = (err.kind is ErrorKind.TIMEOUT and self.deadline is not None
                           and (self.remaining() or 0.0) < 0.1)
        if err.retryable and not cut_by_deadline:
            breaker.record_failure()
            metrics.fallbacks.labels(err.kind.value).inc()
        elif ticket == "probe":
            breaker.release_probe()
        if err.kind in _TERMINAL:
            reason, cls = _TERMINAL[err.kind]
            raise cls(reason, f"the provider refused the request ({err.kind.value})",
                      {"deployment": dep.name, "http_status": err.status_code or 0})
        if err.kind is ErrorKind.CONTEXT_TOO_LONG:
            # Only a candidate with a larger window may be tried.
            window = dep.context_window
            for name, d in self.cfg.deployments.items():
                if d.context_window <= window:
                    self.excluded.add(name)
            metrics.fallbacks.labels("context_too_long").inc()
        if err.kind in _SKIP:
            self.excluded.add(dep.name)
            metrics.fallbacks.labels(err.kind.value).inc()

    def no_credential(self, dep: Deployment, ticket: Ticket, reason: str, t0: float) -> None:
        """The vault issued no usable credential: skip this deployment for the rest of the call."""
        self.add(dep, Outcome.NO_CREDENTIAL, t0, cause=reason)
        self.metrics.attempts.labels(dep.name, "no_credential").inc()
        self.excluded.add(dep.name)
        if ticket == "probe":
            self.breakers[dep.name].release_probe()

    def succeeded(self, dep: Deployment, t0: float, first_byte_s: float) -> None:
        """The provider answered (unary) or the stream's first content came (streaming)."""
        self.breakers[dep.name].record_success(first_byte_s)
        self.metrics.attempts.labels(dep.name, "success").inc()
        self.add(dep, Outcome.SUCCESS, t0)

    def final_error(self) -> E.IgwError:
        """The agent's error once no candidate is left."""
        remaining = self.remaining()
        # Attempts stop 50 ms short of the agent's deadline so the answer still reaches it.
        if remaining is not None and remaining < 0.1:
            return E.DeadlineExceeded("DEADLINE_EXCEEDED", "deadline passed before any deployment answered",
                                      attempts_meta(self.call.model, self.log))
        return final_error(self.call.model, self.log)


# How each attempt outcome counts when every candidate failed (see final_error).
_CONFIG_CAUSES = {ErrorKind.AUTH_FAILED.value, ErrorKind.REDIRECT_REFUSED.value}
_THROTTLED = {Outcome.RATE_LIMITED, Outcome.OVERLOADED}
_TRANSIENT_VAULT = {"VAULT_UNAVAILABLE", "DEADLINE_EXCEEDED", "KEYVAULT_UNAVAILABLE", "UNAVAILABLE"}
# Without a retry-after from any provider, the hint for "all rate limited or overloaded".
DEFAULT_RETRY_DELAY_S = 1.0
_CONFIG_REASON = {
    ErrorKind.AUTH_FAILED.value: "PROVIDER_AUTH_FAILED",
    ErrorKind.REDIRECT_REFUSED.value: "PROVIDER_REDIRECT_REFUSED",
    "LEASE_BASE_URL_MISMATCH": "LEASE_BASE_URL_MISMATCH",
}


def _is_config(att: Attempt) -> bool:
    """A configuration or credential problem: retrying changes nothing until an operator acts."""
    if att.outcome == Outcome.NO_CREDENTIAL:
        return not att.cause.startswith("VAULT_UNAVAILABLE")
    return att.cause in _CONFIG_CAUSES or att.outcome == Outcome.AUTH_FAILED


def _describe(att: Attempt) -> str:
    """One attempt in words for the error message (names and codes only, never provider text)."""
    cause = att.cause
    if att.outcome == Outcome.NO_CREDENTIAL:
        if cause == "LEASE_BASE_URL_MISMATCH":
            what = "the vault's key for this provider is bound to another base URL than the routing config's"
        else:
            what = f"the vault issued no credential ({cause or 'unknown'})"
    elif cause == ErrorKind.AUTH_FAILED.value or att.outcome == Outcome.AUTH_FAILED:
        what = "the provider refused the credential"
    elif cause == ErrorKind.REDIRECT_REFUSED.value:
        what = "the provider answered with a redirect (never followed)"
    else:
        what = att.outcome.name.lower().replace("_", " ")
    if att.http_status:
        what += f" (HTTP {att.http_status})"
    return f"{att.deployment}: {what}"


def final_error(model: str, log: list[Attempt]) -> E.IgwError:
    """The agent's error when every candidate failed, its status chosen by the cause.

    - every tried deployment failed for configuration or credentials (no key, provider
      401/403, lease base URL mismatch, redirect): FAILED_PRECONDITION, never worth retrying;
    - the rest were all rate limited or overloaded: RESOURCE_EXHAUSTED
      ``UPSTREAM_RATE_LIMITED`` with RetryInfo (the shortest retry-after a provider gave);
    - every deployment's breaker open: UNAVAILABLE ``ALL_BREAKERS_OPEN``;
    - otherwise UNAVAILABLE ``ALL_CANDIDATES_FAILED`` (RetryInfo when a provider gave one).

    ErrorInfo metadata lists each attempt: ``attempt_<n>_deployment``, ``attempt_<n>_outcome``,
    ``attempt_<n>_http_status``, ``attempt_<n>_cause``, ``attempt_<n>_retry_after_ms``.
    """
    meta = attempts_meta(model, log)
    tried = [a for a in log if a.outcome != Outcome.BREAKER_OPEN]
    if log and not tried:
        return E.Unavailable("ALL_BREAKERS_OPEN", "every deployment of this model is failing", meta)
    if tried and tried[-1].outcome == Outcome.CONTEXT_TOO_LONG:
        return E.InvalidArgument("CONTEXT_TOO_LONG", "the prompt is longer than every candidate's context", meta)
    return _by_cause(model, tried, meta)


def attempts_meta(model: str, log: list[Attempt]) -> dict[str, object]:
    """ErrorInfo metadata naming each attempt of a failed call (see :func:`final_error`)."""
    meta: dict[str, object] = {"attempts": len(log), "model": model}
    for n, att in enumerate(log, start=1):
        meta[f"attempt_{n}_deployment"] = att.deployment
        meta[f"attempt_{n}_outcome"] = att.outcome.name
        if att.http_status:
            meta[f"attempt_{n}_http_status"] = att.http_status
        if att.cause:
            meta[f"attempt_{n}_cause"] = att.cause
        if att.retry_after_ns is not None:
            meta[f"attempt_{n}_retry_after_ms"] = att.retry_after_ns // 1_000_000
    return meta


def _by_cause(model: str, tried: list[Attempt], meta: dict[str, object]) -> E.IgwError:
    said = "; ".join(dict.fromkeys(_describe(a) for a in tried[:4]))
    if tried and all(_is_config(a) for a in tried):
        kinds = {_CONFIG_REASON.get(a.cause, "NO_CREDENTIAL") for a in tried}
        reason = kinds.pop() if len(kinds) == 1 else "DEPLOYMENTS_MISCONFIGURED"
        return E.FailedPrecondition(
            reason, f"model {model!r} has no usable deployment: {said}; an operator must fix the key or config",
            meta,
        )
    delays = [a.retry_after_ns / 1e9 for a in tried if a.retry_after_ns is not None]
    hint = min(delays) if delays else None
    live = [a for a in tried if not _is_config(a)]
    if live and all(a.outcome in _THROTTLED for a in live):
        return E.ResourceExhausted(
            "UPSTREAM_RATE_LIMITED", f"every deployment of model {model!r} is rate limited or overloaded: {said}",
            meta, retry_delay_s=DEFAULT_RETRY_DELAY_S if hint is None else hint,
        )
    return E.Unavailable(
        "ALL_CANDIDATES_FAILED", f"no deployment of model {model!r} could answer: {said}" if said
        else "no deployment of this model could answer", meta, retry_delay_s=hint,
    )

