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
