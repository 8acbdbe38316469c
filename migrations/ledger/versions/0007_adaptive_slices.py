"""Ledger 0007: adaptive budget slices (slices on by default).

``ledger_hold`` grants a slice at most a quarter of what the tightest budget and rate limit
still have free (net of every open slice), at most the calls asked for; when that is fewer than
two calls it grants none and answers ``NO_SLICE`` (nothing placed, nothing counted), and the
router takes exact per-call holds. Far from a limit a slice is as large as asked; as the free
budget nears what open slices could draw, each new slice is smaller; at the end there are none.
Since every grant leaves at least three quarters of the free budget to others, no router can
starve another of budget that is still free.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADAPTIVE_HOLD = r"""
CREATE OR REPLACE FUNCTION public.ledger_hold(
  p_hold_id uuid, p_request_id text, p_attempt integer, p_team text, p_agent text, p_model text,
  p_provider text, p_prompt bigint, p_max_out bigint, p_calls integer, p_ttl_us bigint,
  p_now timestamp with time zone, p_run text, p_run_cap bigint)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
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
  rl record;
  v_status jsonb := '[]'::jsonb;
  v_denied jsonb := NULL;
  v_key text := CASE WHEN p_calls > 0 THEN 's:' ELSE 'c:' END || p_request_id;
  v_unit_tokens numeric := p_prompt::numeric + p_max_out;
  v_limited boolean := false;
  v_rate_calls numeric := NULL;
  v_allow numeric;
  v_req numeric;
  v_tok numeric;
BEGIN
  -- Shared by every hold of the team, exclusive in ledger_set_budget: a budget created
  -- mid-window is never created while one of the team's holds is being placed.
  PERFORM pg_advisory_xact_lock_shared(ledger_team_lock_key(p_team));
  -- One hold placement per request id at a time, and never after its call was released as a
  -- whole (ledger_release_request takes the same lock): a Reserve still in flight when the
  -- router gave up creates nothing.
  PERFORM pg_advisory_xact_lock(ledger_request_lock_key(p_request_id));
  IF EXISTS (SELECT 1 FROM request_releases WHERE request_id = p_request_id) THEN
    RETURN jsonb_build_object('result', 'REQUEST_RELEASED');
  END IF;
  SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id AND attempt = p_attempt;
  IF FOUND THEN
    IF (v_hold.team, v_hold.agent, v_hold.model, v_hold.prompt_tokens, v_hold.max_output_tokens,
        v_hold.slice_calls > 0, v_hold.run_id)
       IS DISTINCT FROM (p_team, p_agent, p_model, p_prompt, p_max_out, p_calls > 0, p_run) THEN
      RETURN jsonb_build_object('result', 'MISMATCH');
    END IF;
    RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'hold', ledger_hold_json(v_hold),
                              'budgets', ledger_budgets(p_team, p_agent, p_run, p_now));
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

  -- A run named with a cap gets its budget here, in this transaction, when it has none: no
  -- extra call. Racing first requests both succeed (the loser's insert does nothing).
  IF p_run <> '' AND p_run_cap > 0
     AND NOT EXISTS (SELECT 1 FROM budgets WHERE team = p_team AND agent = '' AND run = p_run
                     AND "window" = 4) THEN
    INSERT INTO teams (name) VALUES (p_team) ON CONFLICT DO NOTHING;
    INSERT INTO budgets (team, agent, run, "window", limit_nanos, soft_limit_nanos, updated_at)
    VALUES (p_team, '', p_run, 4, p_run_cap, 0, p_now) ON CONFLICT DO NOTHING;
  END IF;

  SELECT coalesce(array_agg(id ORDER BY id), '{}'),
         coalesce(array_agg("window" ORDER BY id), '{}'),
         coalesce(array_agg(ledger_window_start("window", p_now) ORDER BY id), '{}')
    INTO v_ids, v_wins, v_starts
    FROM budgets WHERE team = p_team AND agent IN ('', p_agent) AND run IN ('', p_run);
  v_n := cardinality(v_ids);
  -- No budget applies: refused unless the operator allows unbudgeted teams (the ledger sets
  -- igw.allow_unbudgeted on its connections from IGW_LEDGER_ALLOW_UNBUDGETED).
  IF v_n = 0 AND coalesce(current_setting('igw.allow_unbudgeted', true), '') <> 'on' THEN
    RETURN jsonb_build_object('result', 'NO_BUDGET', 'price_version', v_version);
  END IF;

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
                                'budgets', ledger_budgets(p_team, p_agent, p_run, p_now));
    END IF;
    FOR r IN
      SELECT b.team, b.agent, b.run, b."window", b.limit_nanos, b.soft_limit_nanos,
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
            'team', r.team, 'agent', r.agent, 'run', r.run, 'window', r."window", 'limit', r.limit_nanos,
            'soft', r.soft_limit_nanos, 'spent', r.spent_nanos, 'held', r.held_nanos,
            'start_us', ledger_us(r.window_start));
        END IF;
      END IF;
      v_room := least(v_room, r.limit_nanos::numeric - r.spent_nanos - r.held_nanos);
      v_status := v_status || jsonb_build_object(
        'team', r.team, 'agent', r.agent, 'run', r.run, 'window', r."window", 'limit', r.limit_nanos,
        'soft', r.soft_limit_nanos, 'spent', r.spent_nanos, 'held', r.held_nanos + v_unit,
        'start_us', ledger_us(r.window_start));
    END LOOP;
    IF v_denied IS NOT NULL THEN
      RETURN jsonb_build_object('result', 'DENIED', 'budget', v_denied, 'amount', v_unit,
                                'price_version', v_version);
    END IF;
  END IF;

  -- Rate limits: the team's row, then the agent's, locked ('' sorts first). Every hold of a
  -- limited team passes here one at a time, so the sums over the last 60 s are exact across
  -- replicas. This request's own earlier attempt (same key) is replaced, not added.
  FOR rl IN
    SELECT * FROM rate_limits WHERE team = p_team AND agent IN ('', p_agent) ORDER BY agent FOR UPDATE
  LOOP
    v_limited := true;
    SELECT coalesce(sum(e.requests), 0), coalesce(sum(e.tokens), 0) INTO v_req, v_tok
      FROM rate_events e
     WHERE e.team = p_team AND (rl.agent = '' OR e.agent = rl.agent)
       AND e.at > p_now - interval '60 seconds' AND e.key <> v_key;
    v_allow := NULL;
    IF rl.requests_per_minute > 0 THEN
      v_allow := rl.requests_per_minute - v_req;
    END IF;
    IF rl.tokens_per_minute > 0 THEN
      IF v_unit_tokens > rl.tokens_per_minute THEN
        RETURN jsonb_build_object('result', 'RATE_TOO_LARGE', 'agent', rl.agent,
                                  'tpm', rl.tokens_per_minute, 'tokens', v_unit_tokens);
      END IF;
      IF v_unit_tokens > 0 THEN
        v_allow := least(v_allow, floor((rl.tokens_per_minute - v_tok) / v_unit_tokens));
      END IF;
    END IF;
    IF v_allow IS NOT NULL AND v_allow < 1 THEN
      RETURN jsonb_build_object(
        'result', 'RATE_LIMITED', 'agent', rl.agent, 'rpm', rl.requests_per_minute,
        'tpm', rl.tokens_per_minute, 'requests', v_req, 'tokens', v_tok,
        'retry_us', ledger_rate_retry_us(
          p_team, rl.agent, p_now,
          CASE WHEN rl.requests_per_minute > 0 THEN greatest(v_req + 1 - rl.requests_per_minute, 0) ELSE 0 END,
          CASE WHEN rl.tokens_per_minute > 0
               THEN greatest(v_tok + v_unit_tokens - rl.tokens_per_minute, 0) ELSE 0 END));
    END IF;
    v_rate_calls := least(v_rate_calls, v_allow);
  END LOOP;

  IF p_calls > 0 THEN
    -- An adaptive slice: at most p_calls, and at most a quarter of what the tightest budget and
    -- rate limit still have free (free already net of every open slice), so a slice never takes
    -- more than a quarter of what is left and no router can starve another of free budget. Room
    -- for fewer than two calls (one, when one is asked) grants none (NO_SLICE, nothing placed):
    -- near the limit every call takes an exact per-call hold.
    v_granted := CASE WHEN v_room IS NULL OR v_unit = 0 THEN p_calls
                      ELSE least(p_calls::numeric, div(v_room, v_unit::numeric * 4))::int END;
    IF v_rate_calls IS NOT NULL THEN
      v_granted := least(v_granted::numeric, div(v_rate_calls, 4))::int;
    END IF;
    IF v_granted < least(p_calls, 2) THEN
      RETURN jsonb_build_object('result', 'NO_SLICE', 'price_version', v_version, 'amount', v_unit);
    END IF;
    v_amount := v_unit * v_granted;
    IF v_granted > 1 THEN
      SELECT coalesce(jsonb_agg(s || jsonb_build_object(
               'held', (s->>'held')::bigint + v_amount - v_unit)), '[]'::jsonb)
        INTO v_status FROM jsonb_array_elements(v_status) AS s;
    END IF;
  END IF;

  INSERT INTO holds (id, request_id, attempt, team, agent, model, provider, prompt_tokens,
                     max_output_tokens, amount_nanos, price_version, budget_ids, window_starts,
                     state, created_at, expires_at, slice_calls, run_id)
  VALUES (p_hold_id, p_request_id, p_attempt, p_team, p_agent, p_model, p_provider, p_prompt,
          p_max_out, v_amount, v_version, v_ids, v_starts, 'OPEN', p_now,
          p_now + make_interval(secs => p_ttl_us / 1000000.0), v_granted, p_run)
  ON CONFLICT (request_id, attempt) DO NOTHING
  RETURNING * INTO v_hold;
  IF NOT FOUND THEN
    -- Only reachable without budgets or limits (no lock serialises duplicates).
    SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id AND attempt = p_attempt;
    RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'hold', ledger_hold_json(v_hold),
                              'budgets', ledger_budgets(p_team, p_agent, p_run, p_now));
  END IF;

  IF v_limited THEN
    INSERT INTO rate_events AS e (key, hold_id, team, agent, at, requests, tokens, unit_tokens)
    VALUES (v_key, v_hold.id, p_team, p_agent, p_now, greatest(v_granted, 1),
            v_unit_tokens * greatest(v_granted, 1), v_unit_tokens)
    ON CONFLICT (key) DO UPDATE SET hold_id = EXCLUDED.hold_id, at = EXCLUDED.at,
      requests = EXCLUDED.requests, tokens = EXCLUDED.tokens, unit_tokens = EXCLUDED.unit_tokens,
      used_calls = 0, used_tokens = 0;
  END IF;

  IF v_n > 0 AND v_amount > 0 THEN
    UPDATE budget_counters c SET held_nanos = c.held_nanos + v_amount
      FROM unnest(v_ids, v_starts) AS k(b, w)
     WHERE c.budget_id = k.b AND c.window_start = k.w;
  END IF;
  RETURN jsonb_build_object('result', 'OK', 'replayed', false, 'hold', ledger_hold_json(v_hold),
                            'budgets', v_status);
END
$function$
"""

PREVIOUS_HOLD = r"""
CREATE OR REPLACE FUNCTION public.ledger_hold(
  p_hold_id uuid, p_request_id text, p_attempt integer, p_team text, p_agent text, p_model text,
  p_provider text, p_prompt bigint, p_max_out bigint, p_calls integer, p_ttl_us bigint,
  p_now timestamp with time zone, p_run text, p_run_cap bigint)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
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
  rl record;
  v_status jsonb := '[]'::jsonb;
  v_denied jsonb := NULL;
  v_key text := CASE WHEN p_calls > 0 THEN 's:' ELSE 'c:' END || p_request_id;
  v_unit_tokens numeric := p_prompt::numeric + p_max_out;
  v_limited boolean := false;
  v_rate_calls numeric := NULL;
  v_allow numeric;
  v_req numeric;
  v_tok numeric;
BEGIN
  -- Shared by every hold of the team, exclusive in ledger_set_budget: a budget created
  -- mid-window is never created while one of the team's holds is being placed.
  PERFORM pg_advisory_xact_lock_shared(ledger_team_lock_key(p_team));
  -- One hold placement per request id at a time, and never after its call was released as a
  -- whole (ledger_release_request takes the same lock): a Reserve still in flight when the
  -- router gave up creates nothing.
  PERFORM pg_advisory_xact_lock(ledger_request_lock_key(p_request_id));
  IF EXISTS (SELECT 1 FROM request_releases WHERE request_id = p_request_id) THEN
    RETURN jsonb_build_object('result', 'REQUEST_RELEASED');
  END IF;
  SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id AND attempt = p_attempt;
  IF FOUND THEN
    IF (v_hold.team, v_hold.agent, v_hold.model, v_hold.prompt_tokens, v_hold.max_output_tokens,
        v_hold.slice_calls > 0, v_hold.run_id)
       IS DISTINCT FROM (p_team, p_agent, p_model, p_prompt, p_max_out, p_calls > 0, p_run) THEN
      RETURN jsonb_build_object('result', 'MISMATCH');
    END IF;
    RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'hold', ledger_hold_json(v_hold),
                              'budgets', ledger_budgets(p_team, p_agent, p_run, p_now));
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

  -- A run named with a cap gets its budget here, in this transaction, when it has none: no
  -- extra call. Racing first requests both succeed (the loser's insert does nothing).
  IF p_run <> '' AND p_run_cap > 0
     AND NOT EXISTS (SELECT 1 FROM budgets WHERE team = p_team AND agent = '' AND run = p_run
                     AND "window" = 4) THEN
    INSERT INTO teams (name) VALUES (p_team) ON CONFLICT DO NOTHING;
    INSERT INTO budgets (team, agent, run, "window", limit_nanos, soft_limit_nanos, updated_at)
    VALUES (p_team, '', p_run, 4, p_run_cap, 0, p_now) ON CONFLICT DO NOTHING;
  END IF;

  SELECT coalesce(array_agg(id ORDER BY id), '{}'),
         coalesce(array_agg("window" ORDER BY id), '{}'),
         coalesce(array_agg(ledger_window_start("window", p_now) ORDER BY id), '{}')
    INTO v_ids, v_wins, v_starts
    FROM budgets WHERE team = p_team AND agent IN ('', p_agent) AND run IN ('', p_run);
  v_n := cardinality(v_ids);
  -- No budget applies: refused unless the operator allows unbudgeted teams (the ledger sets
  -- igw.allow_unbudgeted on its connections from IGW_LEDGER_ALLOW_UNBUDGETED).
  IF v_n = 0 AND coalesce(current_setting('igw.allow_unbudgeted', true), '') <> 'on' THEN
    RETURN jsonb_build_object('result', 'NO_BUDGET', 'price_version', v_version);
  END IF;

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
                                'budgets', ledger_budgets(p_team, p_agent, p_run, p_now));
    END IF;
    FOR r IN
      SELECT b.team, b.agent, b.run, b."window", b.limit_nanos, b.soft_limit_nanos,
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
            'team', r.team, 'agent', r.agent, 'run', r.run, 'window', r."window", 'limit', r.limit_nanos,
            'soft', r.soft_limit_nanos, 'spent', r.spent_nanos, 'held', r.held_nanos,
            'start_us', ledger_us(r.window_start));
        END IF;
      END IF;
      v_room := least(v_room, r.limit_nanos::numeric - r.spent_nanos - r.held_nanos);
      v_status := v_status || jsonb_build_object(
        'team', r.team, 'agent', r.agent, 'run', r.run, 'window', r."window", 'limit', r.limit_nanos,
        'soft', r.soft_limit_nanos, 'spent', r.spent_nanos, 'held', r.held_nanos + v_unit,
        'start_us', ledger_us(r.window_start));
    END LOOP;
    IF v_denied IS NOT NULL THEN
      RETURN jsonb_build_object('result', 'DENIED', 'budget', v_denied, 'amount', v_unit,
                                'price_version', v_version);
    END IF;
  END IF;

  -- Rate limits: the team's row, then the agent's, locked ('' sorts first). Every hold of a
  -- limited team passes here one at a time, so the sums over the last 60 s are exact across
  -- replicas. This request's own earlier attempt (same key) is replaced, not added.
  FOR rl IN
    SELECT * FROM rate_limits WHERE team = p_team AND agent IN ('', p_agent) ORDER BY agent FOR UPDATE
  LOOP
    v_limited := true;
    SELECT coalesce(sum(e.requests), 0), coalesce(sum(e.tokens), 0) INTO v_req, v_tok
      FROM rate_events e
     WHERE e.team = p_team AND (rl.agent = '' OR e.agent = rl.agent)
       AND e.at > p_now - interval '60 seconds' AND e.key <> v_key;
    v_allow := NULL;
    IF rl.requests_per_minute > 0 THEN
      v_allow := rl.requests_per_minute - v_req;
    END IF;
    IF rl.tokens_per_minute > 0 THEN
      IF v_unit_tokens > rl.tokens_per_minute THEN
        RETURN jsonb_build_object('result', 'RATE_TOO_LARGE', 'agent', rl.agent,
                                  'tpm', rl.tokens_per_minute, 'tokens', v_unit_tokens);
      END IF;
      IF v_unit_tokens > 0 THEN
        v_allow := least(v_allow, floor((rl.tokens_per_minute - v_tok) / v_unit_tokens));
      END IF;
    END IF;
    IF v_allow IS NOT NULL AND v_allow < 1 THEN
      RETURN jsonb_build_object(
        'result', 'RATE_LIMITED', 'agent', rl.agent, 'rpm', rl.requests_per_minute,
        'tpm', rl.tokens_per_minute, 'requests', v_req, 'tokens', v_tok,
        'retry_us', ledger_rate_retry_us(
          p_team, rl.agent, p_now,
          CASE WHEN rl.requests_per_minute > 0 THEN greatest(v_req + 1 - rl.requests_per_minute, 0) ELSE 0 END,
          CASE WHEN rl.tokens_per_minute > 0
               THEN greatest(v_tok + v_unit_tokens - rl.tokens_per_minute, 0) ELSE 0 END));
    END IF;
    v_rate_calls := least(v_rate_calls, v_allow);
  END LOOP;

  IF p_calls > 0 THEN
    -- A slice: as many calls as the tightest budget and rate limit have room for, at most p_calls.
    v_granted := CASE WHEN v_room IS NULL OR v_unit = 0 THEN p_calls
                      ELSE least(p_calls::numeric, div(v_room, v_unit))::int END;
    v_granted := least(v_granted::numeric, coalesce(v_rate_calls, v_granted))::int;
    v_amount := v_unit * v_granted;
    IF v_granted > 1 THEN
      SELECT coalesce(jsonb_agg(s || jsonb_build_object(
               'held', (s->>'held')::bigint + v_amount - v_unit)), '[]'::jsonb)
        INTO v_status FROM jsonb_array_elements(v_status) AS s;
    END IF;
  END IF;

  INSERT INTO holds (id, request_id, attempt, team, agent, model, provider, prompt_tokens,
                     max_output_tokens, amount_nanos, price_version, budget_ids, window_starts,
                     state, created_at, expires_at, slice_calls, run_id)
  VALUES (p_hold_id, p_request_id, p_attempt, p_team, p_agent, p_model, p_provider, p_prompt,
          p_max_out, v_amount, v_version, v_ids, v_starts, 'OPEN', p_now,
          p_now + make_interval(secs => p_ttl_us / 1000000.0), v_granted, p_run)
  ON CONFLICT (request_id, attempt) DO NOTHING
  RETURNING * INTO v_hold;
  IF NOT FOUND THEN
    -- Only reachable without budgets or limits (no lock serialises duplicates).
    SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id AND attempt = p_attempt;
    RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'hold', ledger_hold_json(v_hold),
                              'budgets', ledger_budgets(p_team, p_agent, p_run, p_now));
  END IF;

  IF v_limited THEN
    INSERT INTO rate_events AS e (key, hold_id, team, agent, at, requests, tokens, unit_tokens)
    VALUES (v_key, v_hold.id, p_team, p_agent, p_now, greatest(v_granted, 1),
            v_unit_tokens * greatest(v_granted, 1), v_unit_tokens)
    ON CONFLICT (key) DO UPDATE SET hold_id = EXCLUDED.hold_id, at = EXCLUDED.at,
      requests = EXCLUDED.requests, tokens = EXCLUDED.tokens, unit_tokens = EXCLUDED.unit_tokens,
      used_calls = 0, used_tokens = 0;
  END IF;

  IF v_n > 0 AND v_amount > 0 THEN
    UPDATE budget_counters c SET held_nanos = c.held_nanos + v_amount
      FROM unnest(v_ids, v_starts) AS k(b, w)
     WHERE c.budget_id = k.b AND c.window_start = k.w;
  END IF;
  RETURN jsonb_build_object('result', 'OK', 'replayed', false, 'hold', ledger_hold_json(v_hold),
                            'budgets', v_status);
END
$function$
"""


def upgrade() -> None:
    op.execute(ADAPTIVE_HOLD)


def downgrade() -> None:
    op.execute(PREVIOUS_HOLD)
