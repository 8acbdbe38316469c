CREATE OR REPLACE FUNCTION public.ledger_us(p_ts timestamp with time zone)
 RETURNS bigint
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
  SELECT (extract(epoch FROM p_ts) * 1000000)::bigint
$function$
