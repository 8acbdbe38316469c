CREATE OR REPLACE FUNCTION public.ledger_partitions()
 RETURNS TABLE(name text, lo timestamp with time zone, hi timestamp with time zone)
 LANGUAGE sql
 STABLE
AS $function$
  SELECT c.relname::text,
         to_timestamp(substr(c.relname, 16), 'YYYYMM') AT TIME ZONE current_setting('TimeZone')
           AT TIME ZONE 'UTC',
         ledger_window_end(3::smallint, to_timestamp(substr(c.relname, 16), 'YYYYMM')
           AT TIME ZONE current_setting('TimeZone') AT TIME ZONE 'UTC')
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
   WHERE i.inhparent = 'spend_entries'::regclass AND c.relname ~ '^spend_entries_p[0-9]{6}$'
   ORDER BY 1
$function$
