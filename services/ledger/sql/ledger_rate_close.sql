CREATE OR REPLACE FUNCTION public.ledger_rate_close(p_h holds, p_settled boolean, p_tokens numeric)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
BEGIN
  IF p_h.slice_calls > 0 THEN
    IF p_settled THEN
      UPDATE rate_events SET
        requests = greatest(requests, used_calls + 1),
        tokens = (greatest(requests, used_calls + 1) - (used_calls + 1)) * unit_tokens + used_tokens + p_tokens,
        used_calls = used_calls + 1, used_tokens = used_tokens + p_tokens
       WHERE key = 's:' || p_h.request_id AND hold_id = p_h.id;
    ELSE
      UPDATE rate_events SET requests = used_calls, tokens = used_tokens
       WHERE key = 's:' || p_h.request_id AND hold_id = p_h.id;
    END IF;
  ELSIF p_settled THEN
    UPDATE rate_events SET requests = 1, tokens = p_tokens
     WHERE key = 'c:' || p_h.request_id AND hold_id = p_h.id;
  ELSE
    UPDATE rate_events SET requests = 0, tokens = 0
     WHERE key = 'c:' || p_h.request_id AND hold_id = p_h.id;
  END IF;
END
$function$
