"""The ledger's schema as SQLAlchemy 2 typed models (alembic owns the DDL: migrations/ledger).

Tables::

    teams              one row per team ever seen (budgets or holds)
    budgets            (team, agent, window) -> hard limit, soft limit; agent '' = team-wide
    budget_counters    (budget, window start) -> spent, held, soft-limit crossed once
    holds              reservations: amount, price version, the counters they count in, state
    spend_entries      append-only, one per request id; range-partitioned by created_at, one
                       partition a month (spend_entries_pYYYYMM) plus a default partition
    spend_rollup_hourly  per hour/team/agent/model/provider/run totals (kept by a trigger)
    rate_limits        (team, agent) -> requests and tokens per minute
    rate_events        admitted calls and slices of rate-limited teams, last minutes only
    request_releases   request ids released as a whole (a later Reserve for one is refused)
    price_versions     catalogue versions (immutable once written)
    prices             (version, model) -> nano-dollars per million tokens

Money columns are BIGINT nano-dollars (1e-9 USD) and carry CHECK constraints so
nothing that must not be negative ever is. The hot paths (reserve, settle, release,
capture) are plpgsql functions created by the migration; these models define the
schema, the operator reads and the tests' view of it.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Hold states (TEXT with a CHECK: readable in psql, cheap enough).
HOLD_OPEN = "OPEN"
HOLD_SETTLED = "SETTLED"
HOLD_RELEASED = "RELEASED"
HOLD_CAPTURED = "CAPTURED"

# spend_entries.flags is a bitmask of these.
FLAG_OVER_HOLD = 1
FLAG_UNSETTLED_CAPTURE = 2
FLAG_USAGE_ESTIMATED = 4


class Base(DeclarativeBase):
    """Declarative base with the naming convention alembic relies on."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


TZ = DateTime(timezone=True)


class Team(Base):
    """A team: created by SetBudget or by its first Reserve."""

    __tablename__ = "teams"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(TZ, server_default=text("now()"))


class Budget(Base):
    """A hard (and optional soft) limit for a team, one agent of it, or one run of it (agent ''
    and window TOTAL), per window kind."""

    __tablename__ = "budgets"
    __table_args__ = (
        UniqueConstraint("team", "agent", "run", "window"),
        CheckConstraint("limit_nanos >= 0", name="limit_nonneg"),
        CheckConstraint("soft_limit_nanos >= 0 AND soft_limit_nanos <= limit_nanos", name="soft_limit_range"),
        CheckConstraint('"window" BETWEEN 1 AND 4', name="window_known"),
        CheckConstraint("""run = '' OR (agent = '' AND "window" = 4)""", name="run_total"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    team: Mapped[str] = mapped_column(String(128), ForeignKey("teams.name"))
    agent: Mapped[str] = mapped_column(String(128), server_default=text("''"))
    window: Mapped[int] = mapped_column(SmallInteger)
    limit_nanos: Mapped[int] = mapped_column(BigInteger)
    soft_limit_nanos: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    updated_at: Mapped[dt.datetime] = mapped_column(TZ, server_default=text("now()"))
    # '' for team and agent budgets; a run's id for a run's cap.
    run: Mapped[str] = mapped_column(String(128), server_default=text("''"))


class BudgetCounter(Base):
    """Spent and held nano-dollars of one budget in one window (created on demand)."""

    __tablename__ = "budget_counters"
    __table_args__ = (
        CheckConstraint("spent_nanos >= 0", name="spent_nonneg"),
        CheckConstraint("held_nanos >= 0", name="held_nonneg"),
        # Hot row: leave room on each page for HOT updates (no index covers spent/held).
        {"postgresql_with": {"fillfactor": "50"}},
    )

    budget_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True
    )
    window_start: Mapped[dt.datetime] = mapped_column(TZ, primary_key=True)
    spent_nanos: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    held_nanos: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    soft_crossed: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class Hold(Base):
    """A reservation. ``budget_ids[i]``/``window_starts[i]`` are the counters it counts in."""

    __tablename__ = "holds"
    __table_args__ = (
        UniqueConstraint("request_id", "attempt"),
        CheckConstraint("amount_nanos >= 0", name="amount_nonneg"),
        CheckConstraint("attempt >= 0", name="attempt_nonneg"),
        CheckConstraint("prompt_tokens >= 0", name="prompt_tokens_nonneg"),
        CheckConstraint("max_output_tokens >= 0", name="max_output_tokens_nonneg"),
        CheckConstraint("slice_calls >= 0", name="slice_calls_nonneg"),
        CheckConstraint("state IN ('OPEN', 'SETTLED', 'RELEASED', 'CAPTURED')", name="state_known"),
        CheckConstraint(
            "cardinality(budget_ids) = cardinality(window_starts)", name="counters_aligned"
        ),
        Index("ix_holds_open_expires_at", "expires_at", postgresql_where=text("state = 'OPEN'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128))
    attempt: Mapped[int] = mapped_column(Integer)
    # Not a foreign key: a team without any budget may reserve when the operator allows
    # unbudgeted teams (IGW_LEDGER_ALLOW_UNBUDGETED), and needs no row.
    team: Mapped[str] = mapped_column(String(128))
    agent: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(128))
    provider: Mapped[str] = mapped_column(String(128), server_default=text("''"))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    max_output_tokens: Mapped[int] = mapped_column(BigInteger)
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    price_version: Mapped[int] = mapped_column(BigInteger)
    budget_ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    window_starts: Mapped[list[dt.datetime]] = mapped_column(ARRAY(TZ))
    state: Mapped[str] = mapped_column(String(16), server_default=text("'OPEN'"))
    created_at: Mapped[dt.datetime] = mapped_column(TZ)
    expires_at: Mapped[dt.datetime] = mapped_column(TZ)
    closed_at: Mapped[dt.datetime | None] = mapped_column(TZ, nullable=True)
    release_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # 0: one call's hold. N > 0: a budget slice leased to a router for up to N calls; its calls
    # settle against it by their own request ids and it shrinks as they do.
    slice_calls: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # The run the call belongs to ('' for none); copied to its spend entry.
    run_id: Mapped[str] = mapped_column(String(128), server_default=text("''"))


class SpendEntry(Base):
    """One settled (or captured) call; append-only, one per request id (kept by settle and
    capture under the request id's advisory lock: a unique index cannot span partitions)."""

    __tablename__ = "spend_entries"
    __table_args__ = (
        CheckConstraint(
            "input_tokens >= 0 AND output_tokens >= 0 AND cached_input_tokens >= 0"
            " AND cached_input_tokens <= input_tokens",
            name="tokens_valid",
        ),
        CheckConstraint("cost_nanos >= 0 AND held_nanos >= 0", name="money_nonneg"),
        CheckConstraint("latency_us >= 0", name="latency_nonneg"),
        # Operator reads: newest first overall, and per team over a time range.
        Index("ix_spend_entries_created_at_id", "created_at", "id"),
        Index("ix_spend_entries_team_created_at_id", "team", "created_at", "id"),
        Index("ix_spend_entries_request_id", "request_id"),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128))
    reservation_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    team: Mapped[str] = mapped_column(String(128))
    agent: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(128))
    provider: Mapped[str] = mapped_column(String(128))
    provider_model: Mapped[str] = mapped_column(String(256))
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_input_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_nanos: Mapped[int] = mapped_column(BigInteger)
    held_nanos: Mapped[int] = mapped_column(BigInteger)
    price_version: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[int] = mapped_column(SmallInteger)
    flags: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    latency_us: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    created_at: Mapped[dt.datetime] = mapped_column(TZ, primary_key=True)
    reserve_time: Mapped[dt.datetime] = mapped_column(TZ)
    run_id: Mapped[str] = mapped_column(String(128), server_default=text("''"))


class SpendRollupHourly(Base):
    """Spend per UTC hour, team, agent, model, provider and run: what ListSpend reads for whole
    hours. Kept by a statement-level trigger on spend_entries; outlives the entries' retention."""

    __tablename__ = "spend_rollup_hourly"
    __table_args__ = (
        Index("ix_spend_rollup_hourly_team_hour", "team", "hour"),
        {"postgresql_partition_by": "RANGE (hour)"},
    )

    hour: Mapped[dt.datetime] = mapped_column(TZ, primary_key=True)
    team: Mapped[str] = mapped_column(String(128), primary_key=True)
    agent: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    provider: Mapped[str] = mapped_column(String(128), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_count: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(Numeric)
    output_tokens: Mapped[int] = mapped_column(Numeric)
    cached_input_tokens: Mapped[int] = mapped_column(Numeric)
    cost_nanos: Mapped[int] = mapped_column(Numeric)


class RateLimit(Base):
    """Requests and input+output tokens per minute for a team (agent '') or one agent; 0 = none."""

    __tablename__ = "rate_limits"
    __table_args__ = (
        CheckConstraint("requests_per_minute >= 0 AND tokens_per_minute >= 0", name="limits_nonneg"),
    )

    team: Mapped[str] = mapped_column(String(128), primary_key=True)
    agent: Mapped[str] = mapped_column(String(128), primary_key=True, server_default=text("''"))
    requests_per_minute: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    tokens_per_minute: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    updated_at: Mapped[dt.datetime] = mapped_column(TZ, server_default=text("now()"))


class RateEvent(Base):
    """One admitted call (key ``c:<request id>``) or budget slice (``s:<slice id>``) of a
    rate-limited team: what it counts in the sliding 60 s windows from ``at``."""

    __tablename__ = "rate_events"
    __table_args__ = (
        CheckConstraint("requests >= 0 AND tokens >= 0 AND used_calls >= 0", name="counts_nonneg"),
        Index("ix_rate_events_team_at", "team", "at"),
        Index("ix_rate_events_team_agent_at", "team", "agent", "at"),
        Index("ix_rate_events_at", "at"),
    )

    key: Mapped[str] = mapped_column(String(140), primary_key=True)
    hold_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    team: Mapped[str] = mapped_column(String(128))
    agent: Mapped[str] = mapped_column(String(128))
    at: Mapped[dt.datetime] = mapped_column(TZ)
    requests: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Numeric)
    unit_tokens: Mapped[int] = mapped_column(Numeric)
    used_calls: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    used_tokens: Mapped[int] = mapped_column(Numeric, server_default=text("0"))


class SliceDraw(Base):
    """A call a router drew from a budget slice (``NoteSliceDraws``): captured under the call's
    own request id if the slice expires with the call unsettled; deleted with its slice."""

    __tablename__ = "slice_draws"
    __table_args__ = (CheckConstraint("held_nanos >= 0", name="held_nonneg"),)

    hold_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    request_id: Mapped[str] = mapped_column(Text, primary_key=True)
    held_nanos: Mapped[int] = mapped_column(BigInteger)
    noted_at: Mapped[dt.datetime] = mapped_column(TZ)


class RequestRelease(Base):
    """A call that ended early and was released by request id: no hold is placed for it again."""

    __tablename__ = "request_releases"
    __table_args__ = (Index("ix_request_releases_released_at", "released_at"),)

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    released_at: Mapped[dt.datetime] = mapped_column(TZ)


class PriceVersion(Base):
    """One immutable catalogue version; ``request_id`` makes SetPrices idempotent."""

    __tablename__ = "price_versions"
    __table_args__ = (CheckConstraint("version >= 1", name="version_positive"),)

    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    request_id: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    payload_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(TZ, server_default=text("now()"))


class Price(Base):
    """The price of one model in one catalogue version, nano-dollars per million tokens."""

    __tablename__ = "prices"
    __table_args__ = (
        CheckConstraint(
            "input_per_mtok_nanos >= 0 AND output_per_mtok_nanos >= 0 AND cached_input_per_mtok_nanos >= 0",
            name="prices_nonneg",
        ),
    )

    version: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("price_versions.version", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    input_per_mtok_nanos: Mapped[int] = mapped_column(BigInteger)
    output_per_mtok_nanos: Mapped[int] = mapped_column(BigInteger)
    cached_input_per_mtok_nanos: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
