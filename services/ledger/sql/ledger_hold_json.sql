CREATE OR REPLACE FUNCTION public.ledger_hold_json(h holds)
 RETURNS jsonb
 LANGUAGE sql
 STABLE
AS $function$
  SELECT jsonb_build_object(
    'id', h.id, 'request_id', h.request_id, 'attempt', h.attempt, 'team', h.team,
    'agent', h.agent, 'model', h.model, 'amount', h.amount_nanos,
    'price_version', h.price_version, 'state', h.state, 'slice_calls', h.slice_calls,
    'created_us', ledger_us(h.created_at), 'expires_us', ledger_us(h.expires_at), 'run_id', h.run_id)
$function$
