CREATE OR REPLACE FUNCTION public.ledger_create_partition(p_month timestamp with time zone)
 RETURNS boolean
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_lo timestamptz := ledger_window_start(3::smallint, p_month);
  v_hi timestamptz := ledger_window_end(3::smallint, ledger_window_start(3::smallint, p_month));
  v_name text := ledger_partition_name(v_lo);
BEGIN
  IF to_regclass(v_name) IS NOT NULL THEN
    RETURN false;
  END IF;
  IF EXISTS (SELECT 1 FROM spend_entries_default WHERE created_at >= v_lo AND created_at < v_hi) THEN
    EXECUTE format('CREATE TABLE %I (LIKE spend_entries INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', v_name);
    EXECUTE format('WITH moved AS (DELETE FROM spend_entries_default WHERE created_at >= %L AND created_at < %L'
                   ' RETURNING *) INSERT INTO %I SELECT * FROM moved', v_lo, v_hi, v_name);
    EXECUTE format('ALTER TABLE spend_entries ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   v_name, v_lo, v_hi);
  ELSE
    EXECUTE format('CREATE TABLE %I PARTITION OF spend_entries FOR VALUES FROM (%L) TO (%L)',
                   v_name, v_lo, v_hi);
  END IF;
  RETURN true;
END
$function$
