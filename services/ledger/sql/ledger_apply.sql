CREATE OR REPLACE FUNCTION public.ledger_apply(p_ids bigint[], p_starts timestamp with time zone[], p_held bigint[], p_spent bigint[])
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
DECLARE
  k record;
  v_spent bigint;
  v_crossed boolean;
  v_soft bigint;
  v_crossings jsonb := '[]'::jsonb;
BEGIN
  FOR k IN
    SELECT t.b, t.w, sum(t.h)::bigint AS h, sum(t.s)::bigint AS s
    FROM unnest(p_ids, p_starts, p_held, p_spent) AS t(b, w, h, s)
    GROUP BY t.b, t.w ORDER BY t.b, t.w
  LOOP
    UPDATE budget_counters c
       SET held_nanos = c.held_nanos + k.h, spent_nanos = c.spent_nanos + k.s
     WHERE c.budget_id = k.b AND c.window_start = k.w
    RETURNING c.spent_nanos, c.soft_crossed INTO v_spent, v_crossed;
    IF FOUND AND k.s > 0 AND NOT v_crossed THEN
      SELECT soft_limit_nanos INTO v_soft FROM budgets WHERE id = k.b;
      IF v_soft > 0 AND v_spent >= v_soft THEN
        UPDATE budget_counters SET soft_crossed = true WHERE budget_id = k.b AND window_start = k.w;
        v_crossings := v_crossings || (
          SELECT jsonb_build_object('team', b.team, 'agent', b.agent, 'window', b."window",
                                    'soft', b.soft_limit_nanos, 'spent', v_spent,
                                    'start_us', ledger_us(k.w))
          FROM budgets b WHERE b.id = k.b);
      END IF;
    END IF;
  END LOOP;
  RETURN v_crossings;
END
$function$
