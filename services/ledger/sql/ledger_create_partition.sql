CREATE OR REPLACE FUNCTION public.ledger_create_partition(p_month timestamp with time zone)
 RETURNS boolean
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_lo timestamptz := ledger_window_start(3::smallint, p_month);
  v_hi timestamptz := ledger_window_end(3::smallint, ledger_window_start(3::smallint, p_month));
  v_suffix text := to_char(v_lo AT TIME ZONE 'UTC', 'YYYYMM');
BEGIN
  PERFORM ledger_create_month_partition('spend_rollup_hourly', 'spend_rollup_hourly_default', 'hour',
                                        'spend_rollup_hourly_p' || v_suffix, v_lo, v_hi);
  RETURN ledger_create_month_partition('spend_entries', 'spend_entries_default', 'created_at',
                                       ledger_partition_name(v_lo), v_lo, v_hi);
END
$function$
