CREATE OR REPLACE FUNCTION public.ledger_rollup_entries()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
  INSERT INTO spend_rollup_hourly AS r (hour, team, agent, model, provider, run_id, request_count,
                                        input_tokens, output_tokens, cached_input_tokens, cost_nanos)
  SELECT ledger_hour(n.created_at), n.team, n.agent, n.model, n.provider, n.run_id, count(*),
         sum(n.input_tokens), sum(n.output_tokens), sum(n.cached_input_tokens), sum(n.cost_nanos)
    FROM new_entries n
   GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
  ON CONFLICT (hour, team, agent, model, provider, run_id) DO UPDATE
    SET request_count = r.request_count + EXCLUDED.request_count,
        input_tokens = r.input_tokens + EXCLUDED.input_tokens,
        output_tokens = r.output_tokens + EXCLUDED.output_tokens,
        cached_input_tokens = r.cached_input_tokens + EXCLUDED.cached_input_tokens,
        cost_nanos = r.cost_nanos + EXCLUDED.cost_nanos;
  RETURN NULL;
END
$function$
