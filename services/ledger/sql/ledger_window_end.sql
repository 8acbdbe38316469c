CREATE OR REPLACE FUNCTION public.ledger_window_end(p_window smallint, p_start timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
  SELECT CASE p_window
    WHEN 1 THEN ((p_start AT TIME ZONE 'UTC') + interval '1 day') AT TIME ZONE 'UTC'
    WHEN 2 THEN ((p_start AT TIME ZONE 'UTC') + interval '7 days') AT TIME ZONE 'UTC'
    WHEN 3 THEN ((p_start AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'
    ELSE timestamptz 'infinity'
  END
$function$
