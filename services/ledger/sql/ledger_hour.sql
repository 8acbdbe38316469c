CREATE OR REPLACE FUNCTION public.ledger_hour(p_ts timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
  SELECT date_trunc('hour', p_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
$function$
