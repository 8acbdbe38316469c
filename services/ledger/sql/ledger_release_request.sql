CREATE OR REPLACE FUNCTION public.ledger_release_request(p_request_id text, p_reason text, p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_h holds%ROWTYPE;
  v_ids bigint[] := '{}';
  v_starts timestamptz[] := '{}';
  v_held bigint[] := '{}';
  v_released int := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(ledger_request_lock_key(p_request_id));
  INSERT INTO request_releases (request_id, reason, released_at)
  VALUES (p_request_id, p_reason, p_now) ON CONFLICT DO NOTHING;
  FOR v_h IN
    UPDATE holds SET state = 'RELEASED', closed_at = p_now, release_reason = p_reason
     WHERE request_id = p_request_id AND state = 'OPEN' AND slice_calls = 0
    RETURNING *
  LOOP
    v_ids := v_ids || v_h.budget_ids;
    v_starts := v_starts || v_h.window_starts;
    v_held := v_held || array_fill(-v_h.amount_nanos, ARRAY[cardinality(v_h.budget_ids)]);
    v_released := v_released + 1;
  END LOOP;
  IF v_released > 0 THEN
    PERFORM ledger_apply(v_ids, v_starts, v_held, array_fill(0::bigint, ARRAY[cardinality(v_ids)]));
  END IF;
  RETURN jsonb_build_object('result', 'OK', 'released', v_released);
END
$function$
