CREATE OR REPLACE FUNCTION public.ledger_create_month_partition(p_parent text, p_default text, p_column text, p_name text, p_lo timestamp with time zone, p_hi timestamp with time zone)
 RETURNS boolean
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_moving boolean;
BEGIN
  IF to_regclass(p_name) IS NOT NULL THEN
    RETURN false;
  END IF;
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE %I >= %L AND %I < %L)',
                 p_default, p_column, p_lo, p_column, p_hi) INTO STRICT v_moving;
  IF v_moving THEN
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', p_name, p_parent);
    EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= %L AND %I < %L RETURNING *)'
                   ' INSERT INTO %I SELECT * FROM moved', p_default, p_column, p_lo, p_column, p_hi, p_name);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', p_parent, p_name, p_lo, p_hi);
  ELSE
    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)', p_name, p_parent, p_lo, p_hi);
  END IF;
  RETURN true;
END
$function$
