CREATE OR REPLACE FUNCTION public.ledger_prune_rate_events(p_now timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_n int;
BEGIN
  DELETE FROM rate_events WHERE at < p_now - interval '5 minutes';
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$function$
