"""Ledger schema: teams, budgets, window counters, holds, spend entries, price catalogue,
and the plpgsql functions of the hot paths (reserve, settle, release, capture).

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)

# 2**62: the largest amount of nano-dollars (and token count) the ledger accepts.
MAX_AMOUNT = 4611686018427387904

FUNCTIONS = r"""
-- Start of the calendar window (UTC) that contains p_now. 1 DAILY, 2 WEEKLY (Monday),
-- 3 MONTHLY, 4 TOTAL (one window starting at the epoch).
CREATE FUNCTION ledger_window_start(p_window smallint, p_now timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE p_window
    WHEN 1 THEN date_trunc('day', p_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    WHEN 2 THEN date_trunc('week', p_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    WHEN 3 THEN date_trunc('month', p_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    ELSE timestamptz '1970-01-01 00:00:00+00'
  END
$$;

-- Microseconds since the epoch (exact: extract() returns numeric).
CREATE FUNCTION ledger_us(p_ts timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT (extract(epoch FROM p_ts) * 1000000)::bigint
$$;

-- Cost in nano-dollars: each component rounded up, integer (numeric) arithmetic only.
-- Prices are nano-dollars per million tokens; a cached price of 0 means the input price.
CREATE FUNCTION ledger_cost(
  p_input bigint, p_cached bigint, p_output bigint,
  p_in_price bigint, p_cached_price bigint, p_out_price bigint
) RETURNS numeric LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT div((p_input - p_cached)::numeric * p_in_price + 999999, 1000000)
       + div(p_cached::numeric
             * (CASE WHEN p_cached_price = 0 THEN p_in_price ELSE p_cached_price END) + 999999, 1000000)
       + div(p_output::numeric * p_out_price + 999999, 1000000)
$$;

CREATE FUNCTION ledger_hold_json(h holds) RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object(
    'id', h.id, 'request_id', h.request_id, 'attempt', h.attempt, 'team', h.team,
    'agent', h.agent, 'model', h.model, 'amount', h.amount_nanos,
    'price_version', h.price_version, 'state', h.state,
    'created_us', ledger_us(h.created_at), 'expires_us', ledger_us(h.expires_at))
$$;

CREATE FUNCTION ledger_entry_json(e spend_entries) RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object(
    'id', e.id, 'request_id', e.request_id, 'reservation_id', e.reservation_id,
    'team', e.team, 'agent', e.agent, 'model', e.model, 'provider', e.provider,
    'provider_model', e.provider_model, 'input', e.input_tokens, 'output', e.output_tokens,
    'cached', e.cached_input_tokens, 'cost', e.cost_nanos, 'held', e.held_nanos,
    'price_version', e.price_version, 'outcome', e.outcome, 'flags', e.flags,
    'latency_us', e.latency_us, 'created_us', ledger_us(e.created_at),
    'reserve_us', ledger_us(e.reserve_time))
$$;

-- The state of every budget that applies to (team, agent) in the window containing p_now.
-- p_agent = '' gives the team-wide budgets only.
CREATE FUNCTION ledger_budgets(p_team text, p_agent text, p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT coalesce(jsonb_agg(jsonb_build_object(
      'team', b.team, 'agent', b.agent, 'window', b."window", 'limit', b.limit_nanos,
      'soft', b.soft_limit_nanos, 'spent', coalesce(c.spent_nanos, 0),
      'held', coalesce(c.held_nanos, 0),
      'start_us', ledger_us(ledger_window_start(b."window", p_now)))
    ORDER BY b.agent, b."window"), '[]'::jsonb)
  FROM budgets b
  LEFT JOIN budget_counters c
    ON c.budget_id = b.id AND c.window_start = ledger_window_start(b."window", p_now)
  WHERE b.team = p_team AND b.agent IN ('', p_agent)
$$;

-- Applies deltas to counters, locking them in (budget_id, window_start) order (the one
-- global lock order, so settle/release/capture never deadlock with reserve). Marks soft
-- limits crossed, once per budget window, and returns the crossings.
CREATE FUNCTION ledger_apply(
  p_ids bigint[], p_starts timestamptz[], p_held bigint[], p_spent bigint[]
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  k record;
  v_spent bigint;
  v_crossed boolean;
  v_soft bigint;
  v_crossings jsonb := '[]'::jsonb;
BEGIN
  FOR k IN
    SELECT t.b, t.w, sum(t.h)::bigint AS h, sum(t.s)::bigint AS s
    FROM unnest(p_ids, p_starts, p_held, p_spent) AS t(b, w, h, s)
    GROUP BY t.b, t.w ORDER BY t.b, t.w
  LOOP
    UPDATE budget_counters c
       SET held_nanos = c.held_nanos + k.h, spent_nanos = c.spent_nanos + k.s
     WHERE c.budget_id = k.b AND c.window_start = k.w
    RETURNING c.spent_nanos, c.soft_crossed INTO v_spent, v_crossed;
    IF FOUND AND k.s > 0 AND NOT v_crossed THEN
      SELECT soft_limit_nanos INTO v_soft FROM budgets WHERE id = k.b;
      IF v_soft > 0 AND v_spent >= v_soft THEN
        UPDATE budget_counters SET soft_crossed = true WHERE budget_id = k.b AND window_start = k.w;
        v_crossings := v_crossings || (
          SELECT jsonb_build_object('team', b.team, 'agent', b.agent, 'window', b."window",
                                    'soft', b.soft_limit_nanos, 'spent', v_spent,
                                    'start_us', ledger_us(k.w))
          FROM budgets b WHERE b.id = k.b);
      END IF;
    END IF;
  END LOOP;
  RETURN v_crossings;
END
$$;

-- Reserve: one round trip. Locks the applicable window counters in order, checks every
-- budget (spent + held + amount <= limit), inserts the hold and bumps held.
CREATE FUNCTION ledger_reserve(
  p_hold_id uuid, p_request_id text, p_attempt int, p_team text, p_agent text, p_model text,
  p_provider text, p_prompt bigint, p_max_out bigint, p_ttl_us bigint, p_now timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_hold holds%ROWTYPE;
  v_version bigint;
  v_in bigint;
  v_out bigint;
  v_cost numeric;
  v_amount bigint;
  v_ids bigint[];
  v_wins smallint[];
  v_starts timestamptz[];
  v_n int;
  v_locked int;
  r record;
  v_status jsonb := '[]'::jsonb;
  v_denied jsonb := NULL;
BEGIN
  SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id AND attempt = p_attempt;
  IF FOUND THEN
    IF (v_hold.team, v_hold.agent, v_hold.model, v_hold.prompt_tokens, v_hold.max_output_tokens)
       IS DISTINCT FROM (p_team, p_agent, p_model, p_prompt, p_max_out) THEN
      RETURN jsonb_build_object('result', 'MISMATCH');
    END IF;
    RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'hold', ledger_hold_json(v_hold),
                              'budgets', ledger_budgets(p_team, p_agent, p_now));
  END IF;
  IF EXISTS (SELECT 1 FROM spend_entries WHERE request_id = p_request_id) THEN
    RETURN jsonb_build_object('result', 'ALREADY_SETTLED');
  END IF;

  SELECT max(version) INTO v_version FROM price_versions;
  SELECT input_per_mtok_nanos, output_per_mtok_nanos INTO v_in, v_out
    FROM prices WHERE version = v_version AND model = p_model;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('result', 'NOT_PRICED', 'price_version', coalesce(v_version, 0));
  END IF;
  v_cost := ledger_cost(p_prompt, 0, p_max_out, v_in, 0, v_out);
  IF v_cost > 4611686018427387904 THEN
    RETURN jsonb_build_object('result', 'COST_OVERFLOW');
  END IF;
  v_amount := v_cost::bigint;

  SELECT coalesce(array_agg(id ORDER BY id), '{}'),
         coalesce(array_agg("window" ORDER BY id), '{}'),
         coalesce(array_agg(ledger_window_start("window", p_now) ORDER BY id), '{}')
    INTO v_ids, v_wins, v_starts
    FROM budgets WHERE team = p_team AND agent IN ('', p_agent);
  v_n := cardinality(v_ids);

  IF v_n > 0 THEN
    -- ORDER BY is applied before the row locks: counters are locked in key order.
    PERFORM 1 FROM budget_counters c
      JOIN unnest(v_ids, v_starts) AS k(b, w) ON c.budget_id = k.b AND c.window_start = k.w
      ORDER BY c.budget_id, c.window_start FOR UPDATE OF c;
    GET DIAGNOSTICS v_locked = ROW_COUNT;
    IF v_locked < v_n THEN
      -- A new team or window: create the missing counters (racing creators both succeed),
      -- then lock them all.
      INSERT INTO budget_counters (budget_id, window_start)
        SELECT k.b, k.w FROM unnest(v_ids, v_starts) AS k(b, w) ORDER BY k.b, k.w
        ON CONFLICT DO NOTHING;
      PERFORM 1 FROM budget_counters c
        JOIN unnest(v_ids, v_starts) AS k(b, w) ON c.budget_id = k.b AND c.window_start = k.w
        ORDER BY c.budget_id, c.window_start FOR UPDATE OF c;
    END IF;
    -- A concurrent duplicate of this very request may have committed while we waited.
    SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id AND attempt = p_attempt;
    IF FOUND THEN
      RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'hold', ledger_hold_json(v_hold),
                                'budgets', ledger_budgets(p_team, p_agent, p_now));
    END IF;
    FOR r IN
      SELECT b.team, b.agent, b."window", b.limit_nanos, b.soft_limit_nanos,
             c.spent_nanos, c.held_nanos, c.window_start
        FROM budget_counters c
        JOIN unnest(v_ids, v_starts) AS k(b, w) ON c.budget_id = k.b AND c.window_start = k.w
        JOIN budgets b ON b.id = c.budget_id
       ORDER BY c.budget_id, c.window_start
    LOOP
      IF r.spent_nanos::numeric + r.held_nanos + v_amount > r.limit_nanos THEN
        IF v_denied IS NULL THEN
          v_denied := jsonb_build_object(
            'team', r.team, 'agent', r.agent, 'window', r."window", 'limit', r.limit_nanos,
            'soft', r.soft_limit_nanos, 'spent', r.spent_nanos, 'held', r.held_nanos,
            'start_us', ledger_us(r.window_start));
        END IF;
      END IF;
      v_status := v_status || jsonb_build_object(
        'team', r.team, 'agent', r.agent, 'window', r."window", 'limit', r.limit_nanos,
        'soft', r.soft_limit_nanos, 'spent', r.spent_nanos, 'held', r.held_nanos + v_amount,
        'start_us', ledger_us(r.window_start));
    END LOOP;
    IF v_denied IS NOT NULL THEN
      RETURN jsonb_build_object('result', 'DENIED', 'budget', v_denied, 'amount', v_amount,
                                'price_version', v_version);
    END IF;
  END IF;

  INSERT INTO holds (id, request_id, attempt, team, agent, model, provider, prompt_tokens,
                     max_output_tokens, amount_nanos, price_version, budget_ids, window_starts,
                     state, created_at, expires_at)
  VALUES (p_hold_id, p_request_id, p_attempt, p_team, p_agent, p_model, p_provider, p_prompt,
          p_max_out, v_amount, v_version, v_ids, v_starts, 'OPEN', p_now,
          p_now + make_interval(secs => p_ttl_us / 1000000.0))
  ON CONFLICT (request_id, attempt) DO NOTHING
  RETURNING * INTO v_hold;
  IF NOT FOUND THEN
    -- Only reachable without budgets (no counter lock serialises duplicates).
    SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id AND attempt = p_attempt;
    RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'hold', ledger_hold_json(v_hold),
                              'budgets', ledger_budgets(p_team, p_agent, p_now));
  END IF;

  IF v_n > 0 AND v_amount > 0 THEN
    UPDATE budget_counters c SET held_nanos = c.held_nanos + v_amount
      FROM unnest(v_ids, v_starts) AS k(b, w)
     WHERE c.budget_id = k.b AND c.window_start = k.w;
  END IF;
  RETURN jsonb_build_object('result', 'OK', 'replayed', false, 'hold', ledger_hold_json(v_hold),
                            'budgets', v_status);
END
$$;

-- Settle: turns the hold into the request's one spend entry, in the hold's windows.
CREATE FUNCTION ledger_settle(
  p_request_id text, p_reservation uuid, p_input bigint, p_output bigint, p_cached bigint,
  p_provider text, p_provider_model text, p_outcome smallint, p_latency_us bigint,
  p_estimated boolean, p_now timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_e spend_entries%ROWTYPE;
  v_h holds%ROWTYPE;
  v_p prices%ROWTYPE;
  v_cost numeric;
  v_flags int;
  v_n int;
  v_was_open boolean;
  v_crossings jsonb;
BEGIN
  SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
  IF NOT FOUND THEN
    SELECT * INTO v_h FROM holds WHERE id = p_reservation FOR UPDATE;
    IF NOT FOUND THEN
      RETURN jsonb_build_object('result', 'NOT_FOUND');
    END IF;
    IF v_h.request_id <> p_request_id THEN
      RETURN jsonb_build_object('result', 'RESERVATION_MISMATCH');
    END IF;
    -- Settled or captured while we waited for the hold's lock: the entry exists now.
    SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
  END IF;

  IF FOUND THEN
    IF v_e.reservation_id <> p_reservation THEN
      RETURN jsonb_build_object('result', 'MISMATCH');
    END IF;
    IF v_e.flags & 2 = 2 THEN
      RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'captured', true,
                                'entry', ledger_entry_json(v_e));
    END IF;
    IF (v_e.input_tokens, v_e.output_tokens, v_e.cached_input_tokens, v_e.provider,
        v_e.provider_model, v_e.outcome, (v_e.flags & 4 = 4))
       IS DISTINCT FROM (p_input, p_output, p_cached, p_provider, p_provider_model, p_outcome,
                         p_estimated) THEN
      RETURN jsonb_build_object('result', 'MISMATCH');
    END IF;
    RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'entry', ledger_entry_json(v_e));
  END IF;

  SELECT * INTO v_p FROM prices WHERE version = v_h.price_version AND model = v_h.model;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('result', 'NOT_PRICED', 'price_version', v_h.price_version);
  END IF;
  v_cost := ledger_cost(p_input, p_cached, p_output, v_p.input_per_mtok_nanos,
                        v_p.cached_input_per_mtok_nanos, v_p.output_per_mtok_nanos);
  IF v_cost > 4611686018427387904 THEN
    RETURN jsonb_build_object('result', 'COST_OVERFLOW');
  END IF;
  v_flags := (CASE WHEN v_cost > v_h.amount_nanos THEN 1 ELSE 0 END)
           | (CASE WHEN p_estimated THEN 4 ELSE 0 END);

  INSERT INTO spend_entries (request_id, reservation_id, team, agent, model, provider,
                             provider_model, input_tokens, output_tokens, cached_input_tokens,
                             cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
                             created_at, reserve_time)
  VALUES (p_request_id, p_reservation, v_h.team, v_h.agent, v_h.model, p_provider,
          p_provider_model, p_input, p_output, p_cached, v_cost::bigint, v_h.amount_nanos,
          v_h.price_version, p_outcome, v_flags, p_latency_us, p_now, v_h.created_at)
  ON CONFLICT (request_id) DO NOTHING
  RETURNING * INTO v_e;
  IF NOT FOUND THEN
    -- Another attempt's hold of the same request settled concurrently.
    RETURN jsonb_build_object('result', 'MISMATCH');
  END IF;

  v_was_open := v_h.state = 'OPEN';
  UPDATE holds SET state = 'SETTLED', closed_at = p_now WHERE id = v_h.id;
  v_n := cardinality(v_h.budget_ids);
  v_crossings := ledger_apply(
    v_h.budget_ids, v_h.window_starts,
    array_fill(CASE WHEN v_was_open THEN -v_h.amount_nanos ELSE 0 END, ARRAY[v_n]),
    array_fill(v_cost::bigint, ARRAY[v_n]));
  RETURN jsonb_build_object('result', 'OK', 'replayed', false, 'entry', ledger_entry_json(v_e),
                            'was_state', v_h.state, 'crossings', v_crossings,
                            'budgets', ledger_budgets(v_h.team, v_h.agent, p_now));
END
$$;

-- Release: frees an OPEN hold; anything else is a harmless no-op.
CREATE FUNCTION ledger_release(p_id uuid, p_reason text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_h holds%ROWTYPE;
  v_n int;
BEGIN
  UPDATE holds SET state = 'RELEASED', closed_at = p_now, release_reason = p_reason
   WHERE id = p_id AND state = 'OPEN'
  RETURNING * INTO v_h;
  IF NOT FOUND THEN
    IF EXISTS (SELECT 1 FROM holds WHERE id = p_id) THEN
      RETURN jsonb_build_object('result', 'OK', 'released', false);
    END IF;
    RETURN jsonb_build_object('result', 'NOT_FOUND');
  END IF;
  v_n := cardinality(v_h.budget_ids);
  PERFORM ledger_apply(v_h.budget_ids, v_h.window_starts,
                       array_fill(-v_h.amount_nanos, ARRAY[v_n]), array_fill(0::bigint, ARRAY[v_n]));
  RETURN jsonb_build_object('result', 'OK', 'released', true, 'team', v_h.team, 'agent', v_h.agent);
END
$$;

-- Capture: expired OPEN holds become spend entries at their full amount, flagged
-- UNSETTLED_CAPTURE (outcome 0: unknown). SKIP LOCKED makes racing sweepers split the work.
-- A hold whose request already has an entry (an earlier attempt leaked) is freed instead.
CREATE FUNCTION ledger_capture(p_now timestamptz, p_limit int) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_h holds%ROWTYPE;
  v_ids bigint[] := '{}';
  v_starts timestamptz[] := '{}';
  v_held bigint[] := '{}';
  v_spent bigint[] := '{}';
  v_captured jsonb := '[]'::jsonb;
  v_freed int := 0;
  v_n int;
  v_inserted boolean;
BEGIN
  FOR v_h IN
    SELECT * FROM holds WHERE state = 'OPEN' AND expires_at <= p_now
     ORDER BY expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED
  LOOP
    INSERT INTO spend_entries (request_id, reservation_id, team, agent, model, provider,
                               provider_model, input_tokens, output_tokens, cached_input_tokens,
                               cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
                               created_at, reserve_time)
    VALUES (v_h.request_id, v_h.id, v_h.team, v_h.agent, v_h.model, v_h.provider, '',
            v_h.prompt_tokens, v_h.max_output_tokens, 0, v_h.amount_nanos, v_h.amount_nanos,
            v_h.price_version, 0, 2, 0, p_now, v_h.created_at)
    ON CONFLICT (request_id) DO NOTHING;
    v_inserted := FOUND;
    v_n := cardinality(v_h.budget_ids);
    v_ids := v_ids || v_h.budget_ids;
    v_starts := v_starts || v_h.window_starts;
    v_held := v_held || array_fill(-v_h.amount_nanos, ARRAY[v_n]);
    IF v_inserted THEN
      UPDATE holds SET state = 'CAPTURED', closed_at = p_now WHERE id = v_h.id;
      v_spent := v_spent || array_fill(v_h.amount_nanos, ARRAY[v_n]);
      v_captured := v_captured || jsonb_build_object(
        'id', v_h.id, 'request_id', v_h.request_id, 'team', v_h.team, 'amount', v_h.amount_nanos);
    ELSE
      UPDATE holds SET state = 'RELEASED', closed_at = p_now,
                       release_reason = 'expired; request already has a spend entry'
       WHERE id = v_h.id;
      v_spent := v_spent || array_fill(0::bigint, ARRAY[v_n]);
      v_freed := v_freed + 1;
    END IF;
  END LOOP;
  RETURN jsonb_build_object('captured', v_captured, 'freed', v_freed,
                            'crossings', ledger_apply(v_ids, v_starts, v_held, v_spent));
END
$$;
"""

DROP_FUNCTIONS = """
DROP FUNCTION IF EXISTS ledger_capture(timestamptz, int);
DROP FUNCTION IF EXISTS ledger_release(uuid, text, timestamptz);
DROP FUNCTION IF EXISTS ledger_settle(text, uuid, bigint, bigint, bigint, text, text, smallint, bigint,
                                      boolean, timestamptz);
DROP FUNCTION IF EXISTS ledger_reserve(uuid, text, int, text, text, text, text, bigint, bigint, bigint,
                                       timestamptz);
DROP FUNCTION IF EXISTS ledger_apply(bigint[], timestamptz[], bigint[], bigint[]);
DROP FUNCTION IF EXISTS ledger_budgets(text, text, timestamptz);
DROP FUNCTION IF EXISTS ledger_entry_json(spend_entries);
DROP FUNCTION IF EXISTS ledger_hold_json(holds);
DROP FUNCTION IF EXISTS ledger_cost(bigint, bigint, bigint, bigint, bigint, bigint);
DROP FUNCTION IF EXISTS ledger_us(timestamptz);
DROP FUNCTION IF EXISTS ledger_window_start(smallint, timestamptz);
"""


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_teams"),
    )
    op.create_table(
        "budgets",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("team", sa.String(128), nullable=False),
        sa.Column("agent", sa.String(128), server_default=sa.text("''"), nullable=False),
        sa.Column("window", sa.SmallInteger(), nullable=False),
        sa.Column("limit_nanos", sa.BigInteger(), nullable=False),
        sa.Column("soft_limit_nanos", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("updated_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("limit_nanos >= 0", name="ck_budgets_limit_nonneg"),
        sa.CheckConstraint(
            "soft_limit_nanos >= 0 AND soft_limit_nanos <= limit_nanos", name="ck_budgets_soft_limit_range"
        ),
        sa.CheckConstraint('"window" BETWEEN 1 AND 4', name="ck_budgets_window_known"),
        sa.ForeignKeyConstraint(["team"], ["teams.name"], name="fk_budgets_team_teams"),
        sa.PrimaryKeyConstraint("id", name="pk_budgets"),
        sa.UniqueConstraint("team", "agent", "window", name="uq_budgets_team_agent_window"),
    )
    op.create_table(
        "budget_counters",
        sa.Column("budget_id", sa.BigInteger(), nullable=False),
        sa.Column("window_start", TZ, nullable=False),
        sa.Column("spent_nanos", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("held_nanos", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("soft_crossed", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.CheckConstraint("spent_nanos >= 0", name="ck_budget_counters_spent_nonneg"),
        sa.CheckConstraint("held_nanos >= 0", name="ck_budget_counters_held_nonneg"),
        sa.ForeignKeyConstraint(
            ["budget_id"], ["budgets.id"], name="fk_budget_counters_budget_id_budgets", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("budget_id", "window_start", name="pk_budget_counters"),
        postgresql_with={"fillfactor": "50"},
    )
    op.create_table(
        "holds",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("team", sa.String(128), nullable=False),
        sa.Column("agent", sa.String(128), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("provider", sa.String(128), server_default=sa.text("''"), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("max_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("amount_nanos", sa.BigInteger(), nullable=False),
        sa.Column("price_version", sa.BigInteger(), nullable=False),
        sa.Column("budget_ids", postgresql.ARRAY(sa.BigInteger()), nullable=False),
        sa.Column("window_starts", postgresql.ARRAY(TZ), nullable=False),
        sa.Column("state", sa.String(16), server_default=sa.text("'OPEN'"), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
        sa.Column("closed_at", TZ, nullable=True),
        sa.Column("release_reason", sa.Text(), nullable=True),
        sa.CheckConstraint("amount_nanos >= 0", name="ck_holds_amount_nonneg"),
        sa.CheckConstraint("attempt >= 0", name="ck_holds_attempt_nonneg"),
        sa.CheckConstraint(
            "state IN ('OPEN', 'SETTLED', 'RELEASED', 'CAPTURED')", name="ck_holds_state_known"
        ),
        sa.CheckConstraint(
            "cardinality(budget_ids) = cardinality(window_starts)", name="ck_holds_counters_aligned"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_holds"),
        sa.UniqueConstraint("request_id", "attempt", name="uq_holds_request_id_attempt"),
    )
    op.create_index(
        "ix_holds_open_expires_at", "holds", ["expires_at"], postgresql_where=sa.text("state = 'OPEN'")
    )
    op.create_table(
        "spend_entries",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("reservation_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("team", sa.String(128), nullable=False),
        sa.Column("agent", sa.String(128), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("provider", sa.String(128), nullable=False),
        sa.Column("provider_model", sa.String(256), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_nanos", sa.BigInteger(), nullable=False),
        sa.Column("held_nanos", sa.BigInteger(), nullable=False),
        sa.Column("price_version", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.SmallInteger(), nullable=False),
        sa.Column("flags", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("latency_us", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("reserve_time", TZ, nullable=False),
        sa.CheckConstraint(
            "input_tokens >= 0 AND output_tokens >= 0 AND cached_input_tokens >= 0"
            " AND cached_input_tokens <= input_tokens",
            name="ck_spend_entries_tokens_valid",
        ),
        sa.CheckConstraint("cost_nanos >= 0 AND held_nanos >= 0", name="ck_spend_entries_money_nonneg"),
        sa.CheckConstraint("latency_us >= 0", name="ck_spend_entries_latency_nonneg"),
        sa.PrimaryKeyConstraint("id", name="pk_spend_entries"),
        sa.UniqueConstraint("request_id", name="uq_spend_entries_request_id"),
    )
    op.create_index("ix_spend_entries_created_at_id", "spend_entries", ["created_at", "id"])
    op.create_index("ix_spend_entries_team_created_at_id", "spend_entries", ["team", "created_at", "id"])
    op.create_table(
        "price_versions",
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("payload_sha256", sa.String(64), nullable=True),
        sa.Column("created_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("version >= 1", name="ck_price_versions_version_positive"),
        sa.PrimaryKeyConstraint("version", name="pk_price_versions"),
        sa.UniqueConstraint("request_id", name="uq_price_versions_request_id"),
    )
    op.create_table(
        "prices",
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("input_per_mtok_nanos", sa.BigInteger(), nullable=False),
        sa.Column("output_per_mtok_nanos", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_per_mtok_nanos", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint(
            "input_per_mtok_nanos >= 0 AND output_per_mtok_nanos >= 0 AND cached_input_per_mtok_nanos >= 0",
            name="ck_prices_prices_nonneg",
        ),
        sa.ForeignKeyConstraint(
            ["version"], ["price_versions.version"], name="fk_prices_version_price_versions", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("version", "model", name="pk_prices"),
    )
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute(DROP_FUNCTIONS)
    op.drop_table("prices")
    op.drop_table("price_versions")
    op.drop_index("ix_spend_entries_team_created_at_id", table_name="spend_entries")
    op.drop_index("ix_spend_entries_created_at_id", table_name="spend_entries")
    op.drop_table("spend_entries")
    op.drop_index("ix_holds_open_expires_at", table_name="holds")
    op.drop_table("holds")
    op.drop_table("budget_counters")
    op.drop_table("budgets")
    op.drop_table("teams")
