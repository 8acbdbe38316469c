CREATE OR REPLACE FUNCTION public.ledger_cost(p_input bigint, p_cached bigint, p_output bigint, p_in_price bigint, p_cached_price bigint, p_out_price bigint)
 RETURNS numeric
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
  SELECT div((p_input - p_cached)::numeric * p_in_price + 999999, 1000000)
       + div(p_cached::numeric
             * (CASE WHEN p_cached_price = 0 THEN p_in_price ELSE p_cached_price END) + 999999, 1000000)
       + div(p_output::numeric * p_out_price + 999999, 1000000)
$function$
