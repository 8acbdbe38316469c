"""Ledger 0002: non-negative token bounds on holds, budgets created mid-window, Settle by
request id alone.

- CHECK ``holds.prompt_tokens >= 0`` and ``holds.max_output_tokens >= 0`` (0001 missed them).
- 0001's CHECK constraints got the naming convention applied twice
  (``ck_holds_ck_holds_amount_nonneg``); they are renamed to the names the ORM declares.
- ``ledger_set_budget``: SetBudget in one call; a budget created mid-window starts from the
  spend its team (or agent) already settled in the current window, and the team's holds
  still open in that window count in it. ``ledger_reserve`` takes the team's advisory lock
  shared so SetBudget (exclusive) never misses a hold being placed.
- ``ledger_settle`` accepts a NULL reservation: it settles the request's latest open hold.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# ledger_set_budget and its helpers, plus the new ledger_reserve (team lock) and ledger_settle.
FUNCTIONS = r"""
-- The advisory lock key of one team: Reserve takes it shared, SetBudget exclusively.
CREATE FUNCTION ledger_team_lock_key(p_team text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT hashtextextended('ledger-team:' || p_team, 0)
$$;

-- Exclusive end of the UTC calendar window starting at p_start ('infinity' for TOTAL).
CREATE FUNCTION ledger_window_end(p_window smallint, p_start timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE p_window
    WHEN 1 THEN ((p_start AT TIME ZONE 'UTC') + interval '1 day') AT TIME ZONE 'UTC'
    WHEN 2 THEN ((p_start AT TIME ZONE 'UTC') + interval '7 days') AT TIME ZONE 'UTC'
    WHEN 3 THEN ((p_start AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'
    ELSE timestamptz 'infinity'
  END
$$;

-- SetBudget: upserts the budget (and its team) and makes its current window's counter tell
-- the truth from the start: spend the team (or agent) already settled in this window, and
-- its holds still open in this window, count against a budget created mid-window.
-- The team lock (exclusive here, shared in ledger_reserve) means no Reserve of the team is
-- in flight, so every open hold is visible; attaching a hold row-locks it, so a concurrent
-- Settle or capture of it either finished before (its entry is seeded below, in a fresh
-- READ COMMITTED snapshot) or runs after and applies to the new counter.
CREATE FUNCTION ledger_set_budget(
  p_team text, p_agent text, p_window smallint, p_limit bigint, p_soft bigint, p_now timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_b budgets%ROWTYPE;
  v_start timestamptz;
  v_end timestamptz;
  v_held bigint;
BEGIN
  PERFORM pg_advisory_xact_lock(ledger_team_lock_key(p_team));
  INSERT INTO teams (name) VALUES (p_team) ON CONFLICT DO NOTHING;
  INSERT INTO budgets (team, agent, "window", limit_nanos, soft_limit_nanos, updated_at)
  VALUES (p_team, p_agent, p_window, p_limit, p_soft, p_now)
  ON CONFLICT (team, agent, "window") DO UPDATE SET limit_nanos = EXCLUDED.limit_nanos,
    soft_limit_nanos = EXCLUDED.soft_limit_nanos, updated_at = EXCLUDED.updated_at
  RETURNING * INTO v_b;
  v_start := ledger_window_start(p_window, p_now);
  v_end := ledger_window_end(p_window, v_start);

  WITH attached AS (
    UPDATE holds h
       SET budget_ids = h.budget_ids || v_b.id, window_starts = h.window_starts || v_start
     WHERE h.team = p_team AND (p_agent = '' OR h.agent = p_agent) AND h.state = 'OPEN'
       AND h.created_at >= v_start AND h.created_at < v_end AND NOT (v_b.id = ANY (h.budget_ids))
    RETURNING h.amount_nanos)
  SELECT coalesce(sum(amount_nanos), 0)::bigint INTO v_held FROM attached;

  IF EXISTS (SELECT 1 FROM budget_counters WHERE budget_id = v_b.id AND window_start = v_start) THEN
    IF v_held > 0 THEN
      UPDATE budget_counters SET held_nanos = held_nanos + v_held
       WHERE budget_id = v_b.id AND window_start = v_start;
    END IF;
  ELSE
    -- Entries count in the window of their reservation, as holds do.
    INSERT INTO budget_counters (budget_id, window_start, spent_nanos, held_nanos)
    SELECT v_b.id, v_start, coalesce(sum(e.cost_nanos), 0), v_held
      FROM spend_entries e
     WHERE e.team = p_team AND (p_agent = '' OR e.agent = p_agent)
       AND e.created_at >= v_start AND e.reserve_time >= v_start AND e.reserve_time < v_end;
  END IF;

  -- A changed soft limit may alert again this window.
  UPDATE budget_counters SET soft_crossed = false
   WHERE budget_id = v_b.id AND soft_crossed AND (p_soft = 0 OR spent_nanos < p_soft);
  RETURN jsonb_build_object(
    'team', v_b.team, 'agent', v_b.agent, 'window', v_b."window", 'limit', v_b.limit_nanos,
    'soft', v_b.soft_limit_nanos, 'updated_us', ledger_us(v_b.updated_at));
END
$$;

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
"""

DROP_FUNCTIONS = """
DROP FUNCTION IF EXISTS ledger_set_budget(text, text, smallint, bigint, bigint, timestamptz);
DROP FUNCTION IF EXISTS ledger_window_end(smallint, timestamptz);
DROP FUNCTION IF EXISTS ledger_team_lock_key(text);
"""

# 0001's ledger_reserve and ledger_settle, verbatim (a migration never imports another).
FUNCTIONS_0001 = r"""
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
"""


# 0001's CHECK constraints, (table, name the ORM gives them); 0001 created them as ck_<table>_<name>.
CHECKS_0001 = [
    ("budgets", "ck_budgets_limit_nonneg"),
    ("budgets", "ck_budgets_soft_limit_range"),
    ("budgets", "ck_budgets_window_known"),
    ("budget_counters", "ck_budget_counters_spent_nonneg"),
    ("budget_counters", "ck_budget_counters_held_nonneg"),
    ("holds", "ck_holds_amount_nonneg"),
    ("holds", "ck_holds_attempt_nonneg"),
    ("holds", "ck_holds_state_known"),
    ("holds", "ck_holds_counters_aligned"),
    ("spend_entries", "ck_spend_entries_tokens_valid"),
    ("spend_entries", "ck_spend_entries_money_nonneg"),
    ("spend_entries", "ck_spend_entries_latency_nonneg"),
    ("price_versions", "ck_price_versions_version_positive"),
    ("prices", "ck_prices_prices_nonneg"),
]


def _rename_checks(*, doubled_to_single: bool) -> None:
    for table, name in CHECKS_0001:
        old, new = f"ck_{table}_{name}", name
        if not doubled_to_single:
            old, new = new, old
        op.execute(f'ALTER TABLE "{table}" RENAME CONSTRAINT "{old}" TO "{new}"')


def upgrade() -> None:
    _rename_checks(doubled_to_single=True)
    op.create_check_constraint(op.f("ck_holds_prompt_tokens_nonneg"), "holds", "prompt_tokens >= 0")
    op.create_check_constraint(op.f("ck_holds_max_output_tokens_nonneg"), "holds", "max_output_tokens >= 0")
    op.execute(FUNCTIONS)


def downgrade() -> None:
    # ledger_reserve calls ledger_team_lock_key: restore it before dropping the helpers.
    op.execute(FUNCTIONS_0001)
    op.execute(DROP_FUNCTIONS)
    op.drop_constraint(op.f("ck_holds_max_output_tokens_nonneg"), "holds", type_="check")
    op.drop_constraint(op.f("ck_holds_prompt_tokens_nonneg"), "holds", type_="check")
    _rename_checks(doubled_to_single=False)
