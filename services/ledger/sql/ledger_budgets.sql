CREATE OR REPLACE FUNCTION public.ledger_budgets(p_team text, p_agent text, p_run text, p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE
AS $function$
  SELECT coalesce(jsonb_agg(jsonb_build_object(
      'team', b.team, 'agent', b.agent, 'run', b.run, 'window', b."window", 'limit', b.limit_nanos,
      'soft', b.soft_limit_nanos, 'spent', coalesce(c.spent_nanos, 0),
      'held', coalesce(c.held_nanos, 0),
      'start_us', ledger_us(ledger_window_start(b."window", p_now)))
    ORDER BY b.run, b.agent, b."window"), '[]'::jsonb)
  FROM budgets b
  LEFT JOIN budget_counters c
    ON c.budget_id = b.id AND c.window_start = ledger_window_start(b."window", p_now)
  WHERE b.team = p_team AND b.agent IN ('', p_agent) AND b.run IN ('', p_run)
$function$
