CREATE OR REPLACE FUNCTION public.ledger_request_lock_key(p_request_id text)
 RETURNS bigint
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
  SELECT hashtextextended('ledger-request:' || p_request_id, 0)
$function$
