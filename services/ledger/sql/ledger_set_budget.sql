CREATE OR REPLACE FUNCTION public.ledger_set_budget(p_team text, p_agent text, p_run text, p_window smallint, p_limit bigint, p_soft bigint, p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_b budgets%ROWTYPE;
  v_start timestamptz;
  v_end timestamptz;
  v_held bigint;
BEGIN
  PERFORM pg_advisory_xact_lock(ledger_team_lock_key(p_team));
  INSERT INTO teams (name) VALUES (p_team) ON CONFLICT DO NOTHING;
  INSERT INTO budgets (team, agent, run, "window", limit_nanos, soft_limit_nanos, updated_at)
  VALUES (p_team, p_agent, p_run, p_window, p_limit, p_soft, p_now)
  ON CONFLICT (team, agent, run, "window") DO UPDATE SET limit_nanos = EXCLUDED.limit_nanos,
    soft_limit_nanos = EXCLUDED.soft_limit_nanos, updated_at = EXCLUDED.updated_at
  RETURNING * INTO v_b;
  v_start := ledger_window_start(p_window, p_now);
  v_end := ledger_window_end(p_window, v_start);

  WITH attached AS (
    UPDATE holds h
       SET budget_ids = h.budget_ids || v_b.id, window_starts = h.window_starts || v_start
     WHERE h.team = p_team AND (p_agent = '' OR h.agent = p_agent) AND (p_run = '' OR h.run_id = p_run)
       AND h.state = 'OPEN' AND h.created_at >= v_start AND h.created_at < v_end
       AND NOT (v_b.id = ANY (h.budget_ids))
    RETURNING h.amount_nanos)
  SELECT coalesce(sum(amount_nanos), 0)::bigint INTO v_held FROM attached;

  IF EXISTS (SELECT 1 FROM budget_counters WHERE budget_id = v_b.id AND window_start = v_start) THEN
    IF v_held > 0 THEN
      UPDATE budget_counters SET held_nanos = held_nanos + v_held
       WHERE budget_id = v_b.id AND window_start = v_start;
    END IF;
  ELSE
    -- Entries count in the window of their reservation, as holds do.
    INSERT INTO budget_counters (budget_id, window_start, spent_nanos, held_nanos)
    SELECT v_b.id, v_start, coalesce(sum(e.cost_nanos), 0), v_held
      FROM spend_entries e
     WHERE e.team = p_team AND (p_agent = '' OR e.agent = p_agent) AND (p_run = '' OR e.run_id = p_run)
       AND e.created_at >= v_start AND e.reserve_time >= v_start AND e.reserve_time < v_end;
  END IF;

  UPDATE budget_counters SET soft_crossed = false
   WHERE budget_id = v_b.id AND soft_crossed AND (p_soft = 0 OR spent_nanos < p_soft);
  RETURN jsonb_build_object(
    'team', v_b.team, 'agent', v_b.agent, 'run', v_b.run, 'window', v_b."window",
    'limit', v_b.limit_nanos, 'soft', v_b.soft_limit_nanos, 'updated_us', ledger_us(v_b.updated_at));
END
$function$
