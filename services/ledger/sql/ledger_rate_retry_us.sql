CREATE OR REPLACE FUNCTION public.ledger_rate_retry_us(p_team text, p_agent text, p_now timestamp with time zone, p_need_req numeric, p_need_tok numeric)
 RETURNS bigint
 LANGUAGE sql
 STABLE
AS $function$
  WITH ev AS (
    SELECT at, sum(requests) OVER w AS req, sum(tokens) OVER w AS tok
      FROM rate_events
     WHERE team = p_team AND (p_agent = '' OR agent = p_agent) AND at > p_now - interval '60 seconds'
    WINDOW w AS (ORDER BY at ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
  )
  SELECT greatest(coalesce(
    (SELECT ledger_us(min(at) + interval '60 seconds') FROM ev
      WHERE req >= p_need_req AND tok >= p_need_tok) - ledger_us(p_now),
    60000000), 1000)
$function$
