CREATE OR REPLACE FUNCTION public.ledger_team_lock_key(p_team text)
 RETURNS bigint
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
  SELECT hashtextextended('ledger-team:' || p_team, 0)
$function$
