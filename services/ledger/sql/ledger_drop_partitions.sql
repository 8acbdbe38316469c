CREATE OR REPLACE FUNCTION public.ledger_drop_partitions(p_cutoff timestamp with time zone)
 RETURNS text[]
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_dropped text[] := '{}';
  p record;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended('ledger-partitions', 0));
  FOR p IN SELECT * FROM ledger_partitions() WHERE hi <= p_cutoff ORDER BY lo LOOP
    EXECUTE format('ALTER TABLE spend_entries DETACH PARTITION %I', p.name);
    EXECUTE format('DROP TABLE %I', p.name);
    v_dropped := v_dropped || p.name;
  END LOOP;
  DELETE FROM spend_entries_default WHERE created_at < p_cutoff;
  RETURN v_dropped;
END
$function$
