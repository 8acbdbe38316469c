CREATE OR REPLACE FUNCTION public.ledger_entry_json(e spend_entries)
 RETURNS jsonb
 LANGUAGE sql
 STABLE
AS $function$
  SELECT jsonb_build_object(
    'id', e.id, 'request_id', e.request_id, 'reservation_id', e.reservation_id,
    'team', e.team, 'agent', e.agent, 'model', e.model, 'provider', e.provider,
    'provider_model', e.provider_model, 'input', e.input_tokens, 'output', e.output_tokens,
    'cached', e.cached_input_tokens, 'cost', e.cost_nanos, 'held', e.held_nanos,
    'price_version', e.price_version, 'outcome', e.outcome, 'flags', e.flags,
    'latency_us', e.latency_us, 'created_us', ledger_us(e.created_at),
    'reserve_us', ledger_us(e.reserve_time), 'run_id', e.run_id)
$function$
