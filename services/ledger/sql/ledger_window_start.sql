CREATE OR REPLACE FUNCTION public.ledger_window_start(p_window smallint, p_now timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
  SELECT CASE p_window
    WHEN 1 THEN date_trunc('day', p_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    WHEN 2 THEN date_trunc('week', p_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    WHEN 3 THEN date_trunc('month', p_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    ELSE timestamptz '1970-01-01 00:00:00+00'
  END
$function$
