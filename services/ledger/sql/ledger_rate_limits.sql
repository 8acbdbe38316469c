CREATE OR REPLACE FUNCTION public.ledger_rate_limits(p_team text, p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE
AS $function$
  SELECT coalesce(jsonb_agg(jsonb_build_object(
    'team', l.team, 'agent', l.agent, 'rpm', l.requests_per_minute, 'tpm', l.tokens_per_minute,
    'updated_us', ledger_us(l.updated_at),
    'requests', (SELECT coalesce(sum(e.requests), 0) FROM rate_events e
                  WHERE e.team = l.team AND (l.agent = '' OR e.agent = l.agent)
                    AND e.at > p_now - interval '60 seconds'),
    'tokens', (SELECT coalesce(sum(e.tokens), 0) FROM rate_events e
                WHERE e.team = l.team AND (l.agent = '' OR e.agent = l.agent)
                  AND e.at > p_now - interval '60 seconds'))
    ORDER BY l.agent), '[]'::jsonb)
  FROM rate_limits l WHERE l.team = p_team
$function$
