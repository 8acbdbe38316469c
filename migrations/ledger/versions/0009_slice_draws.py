"""Ledger 0009: budget slices record the calls drawn from them (NoteSliceDraws).

A router answers a call drawn from a budget slice once the draw is recorded here (a batched
``NoteSliceDraws`` sent while the provider call runs), and settles the call in the background,
as per-call holds do. If the router dies, the sweeper's capture of the expired slice now writes
one entry per recorded draw that was never settled, under the call's own request id, at the
call's hold (at most what is left of the slice), flagged unsettled; what is left after that goes
under the slice's own id as before. So every answered call has exactly one spend entry without
the call waiting for its settle.

- ``slice_draws`` (hold_id, request_id, held_nanos, noted_at): one row per recorded draw;
  deleted when its slice is released or captured, or when the router withdraws the draw (the
  call ended without spending).
- ``ledger_note_draws``: records (or withdraws) draws; KEY SHARE on the slice, so it runs
  alongside the slice's settles and waits for a capture.
- ``ledger_settle`` / ``ledger_settle_batch`` lock holds FOR NO KEY UPDATE (was FOR UPDATE: the
  same between settles, but no longer blocks draw notes).
- ``ledger_capture`` captures recorded draws as above; ``ledger_release`` forgets a released
  slice's draws.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CREATE_DRAWS = """
CREATE TABLE slice_draws (
  hold_id uuid NOT NULL,
  request_id text NOT NULL,
  held_nanos bigint NOT NULL,
  noted_at timestamptz NOT NULL,
  CONSTRAINT pk_slice_draws PRIMARY KEY (hold_id, request_id),
  CONSTRAINT ck_slice_draws_held_nonneg CHECK (held_nanos >= 0)
)
"""

LEDGER_NOTE_DRAWS = r"""
CREATE OR REPLACE FUNCTION public.ledger_note_draws(p_holds uuid[], p_request_ids text[], p_amounts bigint[], p_withdrawn boolean[], p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_n int := cardinality(p_holds);
  v_out jsonb[];
  v_i int;
  v_state text;
  v_calls int;
BEGIN
  IF v_n IS NULL OR v_n = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  IF cardinality(p_request_ids) <> v_n OR cardinality(p_amounts) <> v_n
     OR cardinality(p_withdrawn) <> v_n THEN
    RAISE EXCEPTION 'ledger_note_draws: arrays of different lengths';
  END IF;
  v_out := array_fill(NULL::jsonb, ARRAY[v_n]);
  -- KEY SHARE on the slices, in id order: notes run alongside the slices' settles (which take
  -- NO KEY UPDATE) but wait for a capture (FOR UPDATE), so a draw is recorded either before a
  -- capture reads the slice's draws or after it, when the slice is no longer open.
  PERFORM 1 FROM holds h WHERE h.id = ANY(p_holds) ORDER BY h.id FOR KEY SHARE;
  FOR v_i IN
    SELECT k.i FROM generate_subscripts(p_holds, 1) AS k(i)
     ORDER BY p_holds[k.i], p_request_ids[k.i], k.i
  LOOP
    SELECT h.state, h.slice_calls INTO v_state, v_calls FROM holds h WHERE h.id = p_holds[v_i];
    IF NOT FOUND THEN
      v_out[v_i] := jsonb_build_object('result', 'NOT_FOUND');
    ELSIF v_calls = 0 THEN
      v_out[v_i] := jsonb_build_object('result', 'NOT_A_SLICE');
    ELSIF p_withdrawn[v_i] THEN
      DELETE FROM slice_draws WHERE hold_id = p_holds[v_i] AND request_id = p_request_ids[v_i];
      v_out[v_i] := jsonb_build_object('result', 'OK');
    ELSIF v_state <> 'OPEN' THEN
      v_out[v_i] := jsonb_build_object('result', 'SLICE_CLOSED', 'state', v_state);
    ELSE
      INSERT INTO slice_draws (hold_id, request_id, held_nanos, noted_at)
      VALUES (p_holds[v_i], p_request_ids[v_i], p_amounts[v_i], p_now)
      ON CONFLICT (hold_id, request_id) DO NOTHING;
      v_out[v_i] := jsonb_build_object('result', 'OK');
    END IF;
  END LOOP;
  RETURN to_jsonb(v_out);
END
$function$
"""

LEDGER_SETTLE = r"""
CREATE OR REPLACE FUNCTION public.ledger_settle(p_request_id text, p_reservation uuid, p_input bigint, p_output bigint, p_cached bigint, p_provider text, p_provider_model text, p_outcome smallint, p_latency_us bigint, p_estimated boolean, p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
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
       ORDER BY attempt DESC LIMIT 1 FOR NO KEY UPDATE;
      IF NOT FOUND THEN
        SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
        IF NOT FOUND THEN
          RETURN jsonb_build_object('result', 'NO_OPEN_HOLD');
        END IF;
        v_settled := true;
      END IF;
    ELSE
      SELECT * INTO v_h FROM holds WHERE id = p_reservation FOR NO KEY UPDATE;
      IF NOT FOUND THEN
        RETURN jsonb_build_object('result', 'NOT_FOUND');
      END IF;
      v_slice := v_h.slice_calls > 0;
      IF v_h.request_id <> p_request_id AND NOT v_slice THEN
        RETURN jsonb_build_object('result', 'RESERVATION_MISMATCH');
      END IF;
      IF v_slice AND v_h.request_id = p_request_id THEN
        RETURN jsonb_build_object('result', 'RESERVATION_MISMATCH');
      END IF;
    END IF;
    IF NOT v_settled THEN
      -- One entry per request id: serialise every writer of this id, then look again.
      PERFORM pg_advisory_xact_lock(ledger_request_lock_key(p_request_id));
      SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
      v_settled := FOUND;
      IF v_settled AND v_e.reservation_id <> v_h.id THEN
        -- Another attempt's hold of the same request settled first.
        RETURN jsonb_build_object('result', 'MISMATCH');
      END IF;
    END IF;
  END IF;

  IF v_settled THEN
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
    v_drawn := CASE WHEN v_was_open THEN least(v_cost, v_h.amount_nanos)::bigint ELSE 0 END;
    v_flags := (CASE WHEN v_cost > v_drawn AND v_was_open THEN 1 ELSE 0 END)
             | (CASE WHEN p_estimated THEN 4 ELSE 0 END);
  ELSE
    v_drawn := CASE WHEN v_was_open THEN v_h.amount_nanos ELSE 0 END;
    v_flags := (CASE WHEN v_cost > v_h.amount_nanos THEN 1 ELSE 0 END)
             | (CASE WHEN p_estimated THEN 4 ELSE 0 END);
  END IF;

  -- Counters before the entry (whose insert takes the hourly rollup row): every writer takes a
  -- hold, then its budget counters, then the rollup, so concurrent settles cannot deadlock.
  v_n := cardinality(v_h.budget_ids);
  v_crossings := ledger_apply(
    v_h.budget_ids, v_h.window_starts,
    array_fill(-v_drawn, ARRAY[v_n]),
    array_fill(v_cost::bigint, ARRAY[v_n]));
  PERFORM ledger_rate_close(v_h, true, p_input::numeric + p_output);
  INSERT INTO spend_entries (request_id, reservation_id, team, agent, model, provider,
                             provider_model, input_tokens, output_tokens, cached_input_tokens,
                             cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
                             created_at, reserve_time, run_id)
  VALUES (p_request_id, v_h.id, v_h.team, v_h.agent, v_h.model, p_provider,
          p_provider_model, p_input, p_output, p_cached, v_cost::bigint,
          CASE WHEN v_slice THEN v_drawn ELSE v_h.amount_nanos END,
          v_h.price_version, p_outcome, v_flags, p_latency_us, p_now, v_h.created_at, v_h.run_id)
  RETURNING * INTO v_e;

  IF v_slice THEN
    IF v_drawn > 0 THEN
      UPDATE holds SET amount_nanos = amount_nanos - v_drawn WHERE id = v_h.id;
    END IF;
  ELSE
    UPDATE holds SET state = 'SETTLED', closed_at = p_now WHERE id = v_h.id;
  END IF;
  RETURN jsonb_build_object('result', 'OK', 'replayed', false, 'entry', ledger_entry_json(v_e),
                            'was_state', v_h.state, 'crossings', v_crossings,
                            'budgets', ledger_budgets(v_h.team, v_h.agent, v_h.run_id, p_now));
END
$function$
"""

LEDGER_SETTLE_BATCH = r"""
CREATE OR REPLACE FUNCTION public.ledger_settle_batch(p_request_ids text[], p_reservations uuid[], p_inputs bigint[], p_outputs bigint[], p_cached bigint[], p_providers text[], p_provider_models text[], p_outcomes smallint[], p_latencies bigint[], p_estimated boolean[], p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_n int := cardinality(p_request_ids);
  v_out jsonb[];
  v_i int;
  v_holds uuid[];
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
  -- Every batch takes its locks in one global order: first the holds it settles (by id), then
  -- the budget counters they touch (by budget and window, as ledger_hold locks them), and only
  -- then, item by item, the rows a settle writes (entries, rollups, rate events). Two batches
  -- for one team's holds (several agents, several slices) then queue behind each other instead
  -- of deadlocking (Postgres breaks a deadlock only after deadlock_timeout, 1 s).
  SELECT array_agg(DISTINCT o.id) INTO v_holds
  FROM generate_subscripts(p_request_ids, 1) AS k(i)
  CROSS JOIN LATERAL (
    SELECT h.id FROM holds h
     WHERE (p_reservations[k.i] IS NOT NULL AND h.id = p_reservations[k.i])
        OR (p_reservations[k.i] IS NULL AND h.request_id = p_request_ids[k.i] AND h.state = 'OPEN')
     ORDER BY h.attempt DESC LIMIT 1
  ) o;
  IF v_holds IS NOT NULL THEN
    PERFORM 1 FROM holds h WHERE h.id = ANY(v_holds) ORDER BY h.id FOR NO KEY UPDATE;
    PERFORM 1 FROM budget_counters c
      WHERE (c.budget_id, c.window_start) IN (
        SELECT u.b, u.w FROM holds h, unnest(h.budget_ids, h.window_starts) AS u(b, w)
         WHERE h.id = ANY(v_holds))
      ORDER BY c.budget_id, c.window_start FOR UPDATE OF c;
  END IF;
  FOR v_i IN
    SELECT k.i
    FROM generate_subscripts(p_request_ids, 1) AS k(i)
    LEFT JOIN LATERAL (
      SELECT h.team, h.agent, h.model, h.run_id, h.id FROM holds h
       WHERE (p_reservations[k.i] IS NOT NULL AND h.id = p_reservations[k.i])
          OR (p_reservations[k.i] IS NULL AND h.request_id = p_request_ids[k.i])
       ORDER BY h.attempt DESC LIMIT 1
    ) o ON true
    ORDER BY o.team NULLS FIRST, o.agent NULLS FIRST, o.model NULLS FIRST, p_providers[k.i],
             o.run_id NULLS FIRST, o.id NULLS FIRST, p_request_ids[k.i], k.i
  LOOP
    v_out[v_i] := ledger_settle(
      p_request_ids[v_i], p_reservations[v_i], p_inputs[v_i], p_outputs[v_i], p_cached[v_i],
      p_providers[v_i], p_provider_models[v_i], p_outcomes[v_i], p_latencies[v_i],
      p_estimated[v_i], p_now);
  END LOOP;
  RETURN to_jsonb(v_out);
END
$function$
"""

LEDGER_CAPTURE = r"""
CREATE OR REPLACE FUNCTION public.ledger_capture(p_now timestamp with time zone, p_limit integer)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
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
  v_due uuid[];
  v_left bigint;
  v_amount bigint;
  v_drawn bigint;
  v_d record;
BEGIN
  -- The expired holds first, then their budget counters (in the order ledger_hold locks them),
  -- then the entries (and their rollup rows): the order every settle takes them in.
  SELECT array_agg(d.id) INTO v_due FROM (
    SELECT id FROM holds WHERE state = 'OPEN' AND expires_at <= p_now
     ORDER BY expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED) d;
  IF v_due IS NULL THEN
    RETURN jsonb_build_object('captured', '[]'::jsonb, 'freed', 0, 'crossings', '[]'::jsonb);
  END IF;
  PERFORM 1 FROM budget_counters c
    WHERE (c.budget_id, c.window_start) IN (
      SELECT u.b, u.w FROM holds h, unnest(h.budget_ids, h.window_starts) AS u(b, w)
       WHERE h.id = ANY(v_due))
    ORDER BY c.budget_id, c.window_start FOR UPDATE OF c;
  FOR v_h IN
    SELECT * FROM holds WHERE id = ANY(v_due) ORDER BY expires_at, id
  LOOP
    v_left := v_h.amount_nanos;
    v_drawn := 0;
    IF v_h.slice_calls > 0 THEN
      -- A slice whose router died: each call it recorded drawing (NoteSliceDraws) and never
      -- settled gets its own entry at its hold (at most what is left of the slice), flagged
      -- unsettled like a per-call hold's capture; the rest goes under the slice's own id.
      FOR v_d IN SELECT * FROM slice_draws WHERE hold_id = v_h.id ORDER BY request_id LOOP
        PERFORM pg_advisory_xact_lock(ledger_request_lock_key(v_d.request_id));
        CONTINUE WHEN EXISTS (SELECT 1 FROM spend_entries WHERE request_id = v_d.request_id);
        v_amount := least(v_d.held_nanos, v_left);
        INSERT INTO spend_entries (request_id, reservation_id, team, agent, model, provider,
                                   provider_model, input_tokens, output_tokens, cached_input_tokens,
                                   cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
                                   created_at, reserve_time, run_id)
        VALUES (v_d.request_id, v_h.id, v_h.team, v_h.agent, v_h.model, v_h.provider, '',
                0, 0, 0, v_amount, v_amount,
                v_h.price_version, 0, 2, 0, p_now, v_h.created_at, v_h.run_id);
        v_left := v_left - v_amount;
        v_drawn := v_drawn + v_amount;
        v_captured := v_captured || jsonb_build_object(
          'id', v_h.id, 'request_id', v_d.request_id, 'team', v_h.team, 'amount', v_amount);
      END LOOP;
      DELETE FROM slice_draws WHERE hold_id = v_h.id;
    END IF;
    PERFORM pg_advisory_xact_lock(ledger_request_lock_key(v_h.request_id));
    v_inserted := NOT EXISTS (SELECT 1 FROM spend_entries WHERE request_id = v_h.request_id);
    IF v_inserted THEN
      INSERT INTO spend_entries (request_id, reservation_id, team, agent, model, provider,
                                 provider_model, input_tokens, output_tokens, cached_input_tokens,
                                 cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
                                 created_at, reserve_time, run_id)
      VALUES (v_h.request_id, v_h.id, v_h.team, v_h.agent, v_h.model, v_h.provider, '',
              0, 0, 0, v_left, v_left,
              v_h.price_version, 0, 2, 0, p_now, v_h.created_at, v_h.run_id);
    END IF;
    v_n := cardinality(v_h.budget_ids);
    v_ids := v_ids || v_h.budget_ids;
    v_starts := v_starts || v_h.window_starts;
    v_held := v_held || array_fill(-v_h.amount_nanos, ARRAY[v_n]);
    IF v_inserted THEN
      UPDATE holds SET state = 'CAPTURED', closed_at = p_now WHERE id = v_h.id;
      v_spent := v_spent || array_fill(v_h.amount_nanos, ARRAY[v_n]);
      v_captured := v_captured || jsonb_build_object(
        'id', v_h.id, 'request_id', v_h.request_id, 'team', v_h.team, 'amount', v_left);
    ELSIF v_drawn > 0 THEN
      UPDATE holds SET state = 'CAPTURED', closed_at = p_now WHERE id = v_h.id;
      v_spent := v_spent || array_fill(v_drawn, ARRAY[v_n]);
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
$function$
"""

LEDGER_RELEASE = r"""
CREATE OR REPLACE FUNCTION public.ledger_release(p_id uuid, p_reason text, p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
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
  IF v_h.slice_calls > 0 THEN
    DELETE FROM slice_draws WHERE hold_id = v_h.id;
  END IF;
  v_n := cardinality(v_h.budget_ids);
  PERFORM ledger_apply(v_h.budget_ids, v_h.window_starts,
                       array_fill(-v_h.amount_nanos, ARRAY[v_n]), array_fill(0::bigint, ARRAY[v_n]));
  PERFORM ledger_rate_close(v_h, false, 0);
  RETURN jsonb_build_object('result', 'OK', 'released', true, 'team', v_h.team, 'agent', v_h.agent);
END
$function$
"""

PREVIOUS_LEDGER_SETTLE = r"""
CREATE OR REPLACE FUNCTION public.ledger_settle(p_request_id text, p_reservation uuid, p_input bigint, p_output bigint, p_cached bigint, p_provider text, p_provider_model text, p_outcome smallint, p_latency_us bigint, p_estimated boolean, p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
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
        RETURN jsonb_build_object('result', 'RESERVATION_MISMATCH');
      END IF;
    END IF;
    IF NOT v_settled THEN
      -- One entry per request id: serialise every writer of this id, then look again.
      PERFORM pg_advisory_xact_lock(ledger_request_lock_key(p_request_id));
      SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
      v_settled := FOUND;
      IF v_settled AND v_e.reservation_id <> v_h.id THEN
        -- Another attempt's hold of the same request settled first.
        RETURN jsonb_build_object('result', 'MISMATCH');
      END IF;
    END IF;
  END IF;

  IF v_settled THEN
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
    v_drawn := CASE WHEN v_was_open THEN least(v_cost, v_h.amount_nanos)::bigint ELSE 0 END;
    v_flags := (CASE WHEN v_cost > v_drawn AND v_was_open THEN 1 ELSE 0 END)
             | (CASE WHEN p_estimated THEN 4 ELSE 0 END);
  ELSE
    v_drawn := CASE WHEN v_was_open THEN v_h.amount_nanos ELSE 0 END;
    v_flags := (CASE WHEN v_cost > v_h.amount_nanos THEN 1 ELSE 0 END)
             | (CASE WHEN p_estimated THEN 4 ELSE 0 END);
  END IF;

  -- Counters before the entry (whose insert takes the hourly rollup row): every writer takes a
  -- hold, then its budget counters, then the rollup, so concurrent settles cannot deadlock.
  v_n := cardinality(v_h.budget_ids);
  v_crossings := ledger_apply(
    v_h.budget_ids, v_h.window_starts,
    array_fill(-v_drawn, ARRAY[v_n]),
    array_fill(v_cost::bigint, ARRAY[v_n]));
  PERFORM ledger_rate_close(v_h, true, p_input::numeric + p_output);
  INSERT INTO spend_entries (request_id, reservation_id, team, agent, model, provider,
                             provider_model, input_tokens, output_tokens, cached_input_tokens,
                             cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
                             created_at, reserve_time, run_id)
  VALUES (p_request_id, v_h.id, v_h.team, v_h.agent, v_h.model, p_provider,
          p_provider_model, p_input, p_output, p_cached, v_cost::bigint,
          CASE WHEN v_slice THEN v_drawn ELSE v_h.amount_nanos END,
          v_h.price_version, p_outcome, v_flags, p_latency_us, p_now, v_h.created_at, v_h.run_id)
  RETURNING * INTO v_e;

  IF v_slice THEN
    IF v_drawn > 0 THEN
      UPDATE holds SET amount_nanos = amount_nanos - v_drawn WHERE id = v_h.id;
    END IF;
  ELSE
    UPDATE holds SET state = 'SETTLED', closed_at = p_now WHERE id = v_h.id;
  END IF;
  RETURN jsonb_build_object('result', 'OK', 'replayed', false, 'entry', ledger_entry_json(v_e),
                            'was_state', v_h.state, 'crossings', v_crossings,
                            'budgets', ledger_budgets(v_h.team, v_h.agent, v_h.run_id, p_now));
END
$function$
"""

PREVIOUS_LEDGER_SETTLE_BATCH = r"""
CREATE OR REPLACE FUNCTION public.ledger_settle_batch(p_request_ids text[], p_reservations uuid[], p_inputs bigint[], p_outputs bigint[], p_cached bigint[], p_providers text[], p_provider_models text[], p_outcomes smallint[], p_latencies bigint[], p_estimated boolean[], p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_n int := cardinality(p_request_ids);
  v_out jsonb[];
  v_i int;
  v_holds uuid[];
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
  -- Every batch takes its locks in one global order: first the holds it settles (by id), then
  -- the budget counters they touch (by budget and window, as ledger_hold locks them), and only
  -- then, item by item, the rows a settle writes (entries, rollups, rate events). Two batches
  -- for one team's holds (several agents, several slices) then queue behind each other instead
  -- of deadlocking (Postgres breaks a deadlock only after deadlock_timeout, 1 s).
  SELECT array_agg(DISTINCT o.id) INTO v_holds
  FROM generate_subscripts(p_request_ids, 1) AS k(i)
  CROSS JOIN LATERAL (
    SELECT h.id FROM holds h
     WHERE (p_reservations[k.i] IS NOT NULL AND h.id = p_reservations[k.i])
        OR (p_reservations[k.i] IS NULL AND h.request_id = p_request_ids[k.i] AND h.state = 'OPEN')
     ORDER BY h.attempt DESC LIMIT 1
  ) o;
  IF v_holds IS NOT NULL THEN
    PERFORM 1 FROM holds h WHERE h.id = ANY(v_holds) ORDER BY h.id FOR UPDATE;
    PERFORM 1 FROM budget_counters c
      WHERE (c.budget_id, c.window_start) IN (
        SELECT u.b, u.w FROM holds h, unnest(h.budget_ids, h.window_starts) AS u(b, w)
         WHERE h.id = ANY(v_holds))
      ORDER BY c.budget_id, c.window_start FOR UPDATE OF c;
  END IF;
  FOR v_i IN
    SELECT k.i
    FROM generate_subscripts(p_request_ids, 1) AS k(i)
    LEFT JOIN LATERAL (
      SELECT h.team, h.agent, h.model, h.run_id, h.id FROM holds h
       WHERE (p_reservations[k.i] IS NOT NULL AND h.id = p_reservations[k.i])
          OR (p_reservations[k.i] IS NULL AND h.request_id = p_request_ids[k.i])
       ORDER BY h.attempt DESC LIMIT 1
    ) o ON true
    ORDER BY o.team NULLS FIRST, o.agent NULLS FIRST, o.model NULLS FIRST, p_providers[k.i],
             o.run_id NULLS FIRST, o.id NULLS FIRST, p_request_ids[k.i], k.i
  LOOP
    v_out[v_i] := ledger_settle(
      p_request_ids[v_i], p_reservations[v_i], p_inputs[v_i], p_outputs[v_i], p_cached[v_i],
      p_providers[v_i], p_provider_models[v_i], p_outcomes[v_i], p_latencies[v_i],
      p_estimated[v_i], p_now);
  END LOOP;
  RETURN to_jsonb(v_out);
END
$function$
"""

PREVIOUS_LEDGER_CAPTURE = r"""
CREATE OR REPLACE FUNCTION public.ledger_capture(p_now timestamp with time zone, p_limit integer)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
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
  v_due uuid[];
BEGIN
  -- The expired holds first, then their budget counters (in the order ledger_hold locks them),
  -- then the entries (and their rollup rows): the order every settle takes them in.
  SELECT array_agg(d.id) INTO v_due FROM (
    SELECT id FROM holds WHERE state = 'OPEN' AND expires_at <= p_now
     ORDER BY expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED) d;
  IF v_due IS NULL THEN
    RETURN jsonb_build_object('captured', '[]'::jsonb, 'freed', 0, 'crossings', '[]'::jsonb);
  END IF;
  PERFORM 1 FROM budget_counters c
    WHERE (c.budget_id, c.window_start) IN (
      SELECT u.b, u.w FROM holds h, unnest(h.budget_ids, h.window_starts) AS u(b, w)
       WHERE h.id = ANY(v_due))
    ORDER BY c.budget_id, c.window_start FOR UPDATE OF c;
  FOR v_h IN
    SELECT * FROM holds WHERE id = ANY(v_due) ORDER BY expires_at, id
  LOOP
    PERFORM pg_advisory_xact_lock(ledger_request_lock_key(v_h.request_id));
    v_inserted := NOT EXISTS (SELECT 1 FROM spend_entries WHERE request_id = v_h.request_id);
    IF v_inserted THEN
      INSERT INTO spend_entries (request_id, reservation_id, team, agent, model, provider,
                                 provider_model, input_tokens, output_tokens, cached_input_tokens,
                                 cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
                                 created_at, reserve_time, run_id)
      VALUES (v_h.request_id, v_h.id, v_h.team, v_h.agent, v_h.model, v_h.provider, '',
              0, 0, 0, v_h.amount_nanos, v_h.amount_nanos,
              v_h.price_version, 0, 2, 0, p_now, v_h.created_at, v_h.run_id);
    END IF;
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
$function$
"""

PREVIOUS_LEDGER_RELEASE = r"""
CREATE OR REPLACE FUNCTION public.ledger_release(p_id uuid, p_reason text, p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
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
  PERFORM ledger_rate_close(v_h, false, 0);
  RETURN jsonb_build_object('result', 'OK', 'released', true, 'team', v_h.team, 'agent', v_h.agent);
END
$function$
"""


def upgrade() -> None:
    op.execute(CREATE_DRAWS)
    for text in (LEDGER_NOTE_DRAWS, LEDGER_SETTLE, LEDGER_SETTLE_BATCH, LEDGER_CAPTURE, LEDGER_RELEASE):
        op.execute(text)


def downgrade() -> None:
    for text in (PREVIOUS_LEDGER_SETTLE, PREVIOUS_LEDGER_SETTLE_BATCH, PREVIOUS_LEDGER_CAPTURE,
                 PREVIOUS_LEDGER_RELEASE):
        op.execute(text)
    op.execute("DROP FUNCTION ledger_note_draws(uuid[], text[], bigint[], boolean[], timestamp with time zone)")
    op.execute("DROP TABLE slice_draws")
