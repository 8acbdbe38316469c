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
