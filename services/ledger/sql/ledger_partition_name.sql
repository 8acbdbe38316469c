CREATE OR REPLACE FUNCTION public.ledger_partition_name(p_month timestamp with time zone)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
  SELECT 'spend_entries_p' || to_char(p_month AT TIME ZONE 'UTC', 'YYYYMM')
$function$
