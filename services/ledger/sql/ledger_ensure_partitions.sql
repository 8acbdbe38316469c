CREATE OR REPLACE FUNCTION public.ledger_ensure_partitions(p_now timestamp with time zone, p_ahead integer)
 RETURNS text[]
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_month timestamptz := ledger_window_start(3::smallint, p_now);
  v_created text[] := '{}';
  i int;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended('ledger-partitions', 0));
  FOR i IN 0 .. greatest(p_ahead, 0) LOOP
    IF ledger_create_partition(v_month) THEN
      v_created := v_created || ledger_partition_name(v_month);
    END IF;
    v_month := ledger_window_end(3::smallint, v_month);
  END LOOP;
  RETURN v_created;
END
$function$
