"""Ledger 0004: budget slices (``AcquireSlice``), the hot-team path.

A router may lease a *slice* of a team's budget: one hold sized for up to N calls of given
bounds, against which it places per-call holds locally, without a ``Reserve`` per call. Each
call is still settled by its own request id (one spend entry per request id), against the
slice's reservation id; the slice's hold shrinks by each call's cost, and ``Release`` returns
what is left. A slice nobody releases (its router died) is captured at expiry like any hold:
what is left of it is charged, flagged unsettled.

- ``holds.slice_calls``: 0 for a call's hold, N > 0 for a slice covering N calls.
- ``ledger_hold``: ``ledger_reserve``'s body, also placing slices; ``ledger_reserve`` calls it.
- ``ledger_settle``: a settle against a slice draws from it and leaves it open.
- ``ledger_settle_batch``: the lock order adds the hold id after team and agent, so the
  settles of one slice take its row at the same point in every batch.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = r"""
-- Places a hold: for one call (p_calls = 0, what Reserve does) or a budget slice of up to
-- p_calls such calls (AcquireSlice). A slice is granted for as many calls as every budget has
-- room for, at most p_calls and at least one; otherwise it is DENIED like a call hold.
CREATE FUNCTION ledger_hold(
  p_hold_id uuid, p_request_id text, p_attempt int, p_team text, p_agent text, p_model text,
  p_provider text, p_prompt bigint, p_max_out bigint, p_calls int, p_ttl_us bigint, p_now timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_hold holds%ROWTYPE;
  v_version bigint;
  v_in bigint;
  v_out bigint;
  v_cost numeric;
  v_unit bigint;
  v_amount bigint;
  v_granted int := 0;
  v_room numeric := NULL;
  v_ids bigint[];
  v_wins smallint[];
  v_starts timestamptz[];
  v_n int;
  v_locked int;
  r record;
  v_status jsonb := '[]'::jsonb;
  v_denied jsonb := NULL;
BEGIN
  -- Shared by every hold of the team, exclusive in ledger_set_budget: a budget created
  -- mid-window is never created while one of the team's holds is being placed.
  PERFORM pg_advisory_xact_lock_shared(ledger_team_lock_key(p_team));
  SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id AND attempt = p_attempt;
  IF FOUND THEN
    IF (v_hold.team, v_hold.agent, v_hold.model, v_hold.prompt_tokens, v_hold.max_output_tokens,
        v_hold.slice_calls > 0)
       IS DISTINCT FROM (p_team, p_agent, p_model, p_prompt, p_max_out, p_calls > 0) THEN
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
  IF v_cost * greatest(p_calls, 1) > 4611686018427387904 THEN
    RETURN jsonb_build_object('result', 'COST_OVERFLOW');
  END IF;
  v_unit := v_cost::bigint;
  v_amount := v_unit;

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
      -- One call must fit every budget (a slice too: at least one call).
      IF r.spent_nanos::numeric + r.held_nanos + v_unit > r.limit_nanos THEN
        IF v_denied IS NULL THEN
          v_denied := jsonb_build_object(
            'team', r.team, 'agent', r.agent, 'window', r."window", 'limit', r.limit_nanos,
            'soft', r.soft_limit_nanos, 'spent', r.spent_nanos, 'held', r.held_nanos,
            'start_us', ledger_us(r.window_start));
        END IF;
      END IF;
      v_room := least(v_room, r.limit_nanos::numeric - r.spent_nanos - r.held_nanos);
      v_status := v_status || jsonb_build_object(
        'team', r.team, 'agent', r.agent, 'window', r."window", 'limit', r.limit_nanos,
        'soft', r.soft_limit_nanos, 'spent', r.spent_nanos, 'held', r.held_nanos + v_unit,
        'start_us', ledger_us(r.window_start));
    END LOOP;
    IF v_denied IS NOT NULL THEN
      RETURN jsonb_build_object('result', 'DENIED', 'budget', v_denied, 'amount', v_unit,
                                'price_version', v_version);
    END IF;
  END IF;

  IF p_calls > 0 THEN
    -- A slice: as many calls as the tightest budget has room for, at most p_calls.
    v_granted := CASE WHEN v_room IS NULL OR v_unit = 0 THEN p_calls
                      ELSE least(p_calls::numeric, div(v_room, v_unit))::int END;
    v_amount := v_unit * v_granted;
    IF v_granted > 1 THEN
      SELECT coalesce(jsonb_agg(s || jsonb_build_object(
               'held', (s->>'held')::bigint + v_amount - v_unit)), '[]'::jsonb)
        INTO v_status FROM jsonb_array_elements(v_status) AS s;
    END IF;
  END IF;

  INSERT INTO holds (id, request_id, attempt, team, agent, model, provider, prompt_tokens,
                     max_output_tokens, amount_nanos, price_version, budget_ids, window_starts,
                     state, created_at, expires_at, slice_calls)
  VALUES (p_hold_id, p_request_id, p_attempt, p_team, p_agent, p_model, p_provider, p_prompt,
          p_max_out, v_amount, v_version, v_ids, v_starts, 'OPEN', p_now,
          p_now + make_interval(secs => p_ttl_us / 1000000.0), v_granted)
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

CREATE OR REPLACE FUNCTION ledger_reserve(
  p_hold_id uuid, p_request_id text, p_attempt int, p_team text, p_agent text, p_model text,
  p_provider text, p_prompt bigint, p_max_out bigint, p_ttl_us bigint, p_now timestamptz
) RETURNS jsonb LANGUAGE sql AS $$
  SELECT ledger_hold(p_hold_id, p_request_id, p_attempt, p_team, p_agent, p_model, p_provider,
                     p_prompt, p_max_out, 0, p_ttl_us, p_now)
$$;

CREATE OR REPLACE FUNCTION ledger_hold_json(h holds) RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object(
    'id', h.id, 'request_id', h.request_id, 'attempt', h.attempt, 'team', h.team,
    'agent', h.agent, 'model', h.model, 'amount', h.amount_nanos,
    'price_version', h.price_version, 'state', h.state, 'slice_calls', h.slice_calls,
    'created_us', ledger_us(h.created_at), 'expires_us', ledger_us(h.expires_at))
$$;

-- Settle: turns the hold into the request's one spend entry, in the hold's windows.
-- p_reservation NULL: the request's open hold of the latest attempt (NO_OPEN_HOLD if none).
-- A slice's reservation: the call's entry is drawn from the slice (the slice's hold shrinks by
-- the cost, as far as it goes; the slice stays open for its other calls). A slice that is no
-- longer open (released, or captured at expiry) still gets the entry, and the cost counts as
-- spent on top: budgets err on the side of never overspending.
CREATE OR REPLACE FUNCTION ledger_settle(
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
  v_settled boolean;
  v_slice boolean := false;
  v_drawn bigint;
BEGIN
  SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
  v_settled := FOUND;
  IF NOT v_settled THEN
    IF p_reservation IS NULL THEN
      -- By request id alone: the open hold of the latest attempt.
      SELECT * INTO v_h FROM holds WHERE request_id = p_request_id AND state = 'OPEN'
       ORDER BY attempt DESC LIMIT 1 FOR UPDATE;
      IF NOT FOUND THEN
        -- Settled or captured while we waited for the hold's lock (its row then no longer
        -- matches), or there never was an open hold.
        SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
        IF NOT FOUND THEN
          RETURN jsonb_build_object('result', 'NO_OPEN_HOLD');
        END IF;
        v_settled := true;
      END IF;
    ELSE
      SELECT * INTO v_h FROM holds WHERE id = p_reservation FOR UPDATE;
      IF NOT FOUND THEN
        RETURN jsonb_build_object('result', 'NOT_FOUND');
      END IF;
      v_slice := v_h.slice_calls > 0;
      IF v_h.request_id <> p_request_id AND NOT v_slice THEN
        RETURN jsonb_build_object('result', 'RESERVATION_MISMATCH');
      END IF;
      IF v_slice AND v_h.request_id = p_request_id THEN
        -- The slice's own id is not a call's request id.
        RETURN jsonb_build_object('result', 'RESERVATION_MISMATCH');
      END IF;
    END IF;
    IF NOT v_settled THEN
      -- Settled or captured while we waited for the hold's lock: the entry exists now.
      SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
      v_settled := FOUND;
    END IF;
  END IF;

  IF v_settled THEN
    -- Without a reservation id the replay is judged on the payload alone.
    IF p_reservation IS NOT NULL AND v_e.reservation_id <> p_reservation THEN
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
  v_was_open := v_h.state = 'OPEN';
  IF v_slice THEN
    -- What the slice can still cover of this call; the rest is over the hold (flag 1).
    v_drawn := CASE WHEN v_was_open THEN least(v_cost, v_h.amount_nanos)::bigint ELSE 0 END;
    v_flags := (CASE WHEN v_cost > v_drawn AND v_was_open THEN 1 ELSE 0 END)
             | (CASE WHEN p_estimated THEN 4 ELSE 0 END);
  ELSE
    v_drawn := CASE WHEN v_was_open THEN v_h.amount_nanos ELSE 0 END;
    v_flags := (CASE WHEN v_cost > v_h.amount_nanos THEN 1 ELSE 0 END)
             | (CASE WHEN p_estimated THEN 4 ELSE 0 END);
  END IF;

  INSERT INTO spend_entries (request_id, reservation_id, team, agent, model, provider,
                             provider_model, input_tokens, output_tokens, cached_input_tokens,
                             cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
                             created_at, reserve_time)
  VALUES (p_request_id, v_h.id, v_h.team, v_h.agent, v_h.model, p_provider,
          p_provider_model, p_input, p_output, p_cached, v_cost::bigint,
          CASE WHEN v_slice THEN v_drawn ELSE v_h.amount_nanos END,
          v_h.price_version, p_outcome, v_flags, p_latency_us, p_now, v_h.created_at)
  ON CONFLICT (request_id) DO NOTHING
  RETURNING * INTO v_e;
  IF NOT FOUND THEN
    -- Another attempt's hold of the same request settled concurrently.
    RETURN jsonb_build_object('result', 'MISMATCH');
  END IF;

  IF v_slice THEN
    IF v_drawn > 0 THEN
      UPDATE holds SET amount_nanos = amount_nanos - v_drawn WHERE id = v_h.id;
    END IF;
  ELSE
    UPDATE holds SET state = 'SETTLED', closed_at = p_now WHERE id = v_h.id;
  END IF;
  v_n := cardinality(v_h.budget_ids);
  v_crossings := ledger_apply(
    v_h.budget_ids, v_h.window_starts,
    array_fill(-v_drawn, ARRAY[v_n]),
    array_fill(v_cost::bigint, ARRAY[v_n]));
  RETURN jsonb_build_object('result', 'OK', 'replayed', false, 'entry', ledger_entry_json(v_e),
                            'was_state', v_h.state, 'crossings', v_crossings,
                            'budgets', ledger_budgets(v_h.team, v_h.agent, p_now));
END
$$;

-- The settles of a batch in one transaction, in one lock order: the hold's team, agent, then
-- the hold itself (the settles of one slice take its row once, in the same place in every
-- batch), then request id.
CREATE OR REPLACE FUNCTION ledger_settle_batch(
  p_request_ids text[], p_reservations uuid[], p_inputs bigint[], p_outputs bigint[],
  p_cached bigint[], p_providers text[], p_provider_models text[], p_outcomes smallint[],
  p_latencies bigint[], p_estimated boolean[], p_now timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_n int := cardinality(p_request_ids);
  v_out jsonb[];
  v_i int;
BEGIN
  IF v_n IS NULL OR v_n = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  IF cardinality(p_reservations) <> v_n OR cardinality(p_inputs) <> v_n
     OR cardinality(p_outputs) <> v_n OR cardinality(p_cached) <> v_n
     OR cardinality(p_providers) <> v_n OR cardinality(p_provider_models) <> v_n
     OR cardinality(p_outcomes) <> v_n OR cardinality(p_latencies) <> v_n
     OR cardinality(p_estimated) <> v_n THEN
    RAISE EXCEPTION 'ledger_settle_batch: arrays of different lengths';
  END IF;
  v_out := array_fill(NULL::jsonb, ARRAY[v_n]);
  FOR v_i IN
    SELECT k.i
    FROM generate_subscripts(p_request_ids, 1) AS k(i)
    LEFT JOIN LATERAL (
      SELECT h.team, h.agent, h.id FROM holds h
       WHERE (p_reservations[k.i] IS NOT NULL AND h.id = p_reservations[k.i])
          OR (p_reservations[k.i] IS NULL AND h.request_id = p_request_ids[k.i])
       ORDER BY h.attempt DESC LIMIT 1
    ) o ON true
    ORDER BY o.team NULLS FIRST, o.agent NULLS FIRST, o.id NULLS FIRST, p_request_ids[k.i], k.i
  LOOP
    v_out[v_i] := ledger_settle(
      p_request_ids[v_i], p_reservations[v_i], p_inputs[v_i], p_outputs[v_i], p_cached[v_i],
      p_providers[v_i], p_provider_models[v_i], p_outcomes[v_i], p_latencies[v_i],
      p_estimated[v_i], p_now);
  END LOOP;
  RETURN to_jsonb(v_out);
END
$$;
"""

# 0002's ledger_reserve and ledger_settle, 0003's ledger_settle_batch and 0001's ledger_hold_json,
# verbatim (a migration never imports another).
PREVIOUS = r"""
CREATE OR REPLACE FUNCTION ledger_reserve(
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
  -- Shared by every Reserve of the team, exclusive in ledger_set_budget: a budget created
  -- mid-window is never created while one of the team's holds is being placed.
  PERFORM pg_advisory_xact_lock_shared(ledger_team_lock_key(p_team));
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
-- p_reservation NULL: the request's open hold of the latest attempt (NO_OPEN_HOLD if none).
CREATE OR REPLACE FUNCTION ledger_settle(
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
  v_settled boolean;
BEGIN
  SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
  v_settled := FOUND;
  IF NOT v_settled THEN
    IF p_reservation IS NULL THEN
      -- By request id alone: the open hold of the latest attempt.
      SELECT * INTO v_h FROM holds WHERE request_id = p_request_id AND state = 'OPEN'
       ORDER BY attempt DESC LIMIT 1 FOR UPDATE;
      IF NOT FOUND THEN
        -- Settled or captured while we waited for the hold's lock (its row then no longer
        -- matches), or there never was an open hold.
        SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
        IF NOT FOUND THEN
          RETURN jsonb_build_object('result', 'NO_OPEN_HOLD');
        END IF;
        v_settled := true;
      END IF;
    ELSE
      SELECT * INTO v_h FROM holds WHERE id = p_reservation FOR UPDATE;
      IF NOT FOUND THEN
        RETURN jsonb_build_object('result', 'NOT_FOUND');
      END IF;
      IF v_h.request_id <> p_request_id THEN
        RETURN jsonb_build_object('result', 'RESERVATION_MISMATCH');
      END IF;
    END IF;
    IF NOT v_settled THEN
      -- Settled or captured while we waited for the hold's lock: the entry exists now.
      SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
      v_settled := FOUND;
    END IF;
  END IF;

  IF v_settled THEN
    -- Without a reservation id the replay is judged on the payload alone.
    IF p_reservation IS NOT NULL AND v_e.reservation_id <> p_reservation THEN
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
  VALUES (p_request_id, v_h.id, v_h.team, v_h.agent, v_h.model, p_provider,
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

CREATE OR REPLACE FUNCTION ledger_settle_batch(
  p_request_ids text[], p_reservations uuid[], p_inputs bigint[], p_outputs bigint[],
  p_cached bigint[], p_providers text[], p_provider_models text[], p_outcomes smallint[],
  p_latencies bigint[], p_estimated boolean[], p_now timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_n int := cardinality(p_request_ids);
  v_out jsonb[];
  v_i int;
BEGIN
  IF v_n IS NULL OR v_n = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  IF cardinality(p_reservations) <> v_n OR cardinality(p_inputs) <> v_n
     OR cardinality(p_outputs) <> v_n OR cardinality(p_cached) <> v_n
     OR cardinality(p_providers) <> v_n OR cardinality(p_provider_models) <> v_n
     OR cardinality(p_outcomes) <> v_n OR cardinality(p_latencies) <> v_n
     OR cardinality(p_estimated) <> v_n THEN
    RAISE EXCEPTION 'ledger_settle_batch: arrays of different lengths';
  END IF;
  v_out := array_fill(NULL::jsonb, ARRAY[v_n]);
  FOR v_i IN
    SELECT k.i
    FROM generate_subscripts(p_request_ids, 1) AS k(i)
    LEFT JOIN LATERAL (
      SELECT h.team, h.agent FROM holds h
       WHERE (p_reservations[k.i] IS NOT NULL AND h.id = p_reservations[k.i])
          OR (p_reservations[k.i] IS NULL AND h.request_id = p_request_ids[k.i])
       ORDER BY h.attempt DESC LIMIT 1
    ) o ON true
    ORDER BY o.team NULLS FIRST, o.agent NULLS FIRST, p_request_ids[k.i], k.i
  LOOP
    v_out[v_i] := ledger_settle(
      p_request_ids[v_i], p_reservations[v_i], p_inputs[v_i], p_outputs[v_i], p_cached[v_i],
      p_providers[v_i], p_provider_models[v_i], p_outcomes[v_i], p_latencies[v_i],
      p_estimated[v_i], p_now);
  END LOOP;
  RETURN to_jsonb(v_out);
END
$$;

CREATE OR REPLACE FUNCTION ledger_hold_json(h holds) RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object(
    'id', h.id, 'request_id', h.request_id, 'attempt', h.attempt, 'team', h.team,
    'agent', h.agent, 'model', h.model, 'amount', h.amount_nanos,
    'price_version', h.price_version, 'state', h.state,
    'created_us', ledger_us(h.created_at), 'expires_us', ledger_us(h.expires_at))
$$;
"""



def upgrade() -> None:
    op.add_column("holds", sa.Column("slice_calls", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.create_check_constraint(op.f("ck_holds_slice_calls_nonneg"), "holds", "slice_calls >= 0")
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute(PREVIOUS)
    op.execute(
        "DROP FUNCTION IF EXISTS ledger_hold(uuid, text, int, text, text, text, text, bigint, bigint, int, "
        "bigint, timestamptz)"
    )
    op.drop_constraint(op.f("ck_holds_slice_calls_nonneg"), "holds", type_="check")
    op.drop_column("holds", "slice_calls")
