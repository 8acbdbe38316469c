CREATE OR REPLACE FUNCTION public.ledger_reserve(p_hold_id uuid, p_request_id text, p_attempt integer, p_team text, p_agent text, p_model text, p_provider text, p_prompt bigint, p_max_out bigint, p_ttl_us bigint, p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
AS $function$
  SELECT ledger_hold(p_hold_id, p_request_id, p_attempt, p_team, p_agent, p_model, p_provider,
                     p_prompt, p_max_out, 0, p_ttl_us, p_now, '', 0)
$function$
