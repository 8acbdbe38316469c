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
