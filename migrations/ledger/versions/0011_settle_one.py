"""Ledger 0011: a settle batch of one skips the batch's sorting and array work.

At low rates a router's settle batches carry one call each. ``ledger_settle_batch`` spent about
0.55 ms of Postgres CPU per such batch on work only a batch of several needs (``generate_subscripts``,
the lateral look-ups that sort the items, ``array_agg(DISTINCT ...)``, the result array), measured
with ``pg_stat_statements`` at 10 calls/s (bench/analysis.md, run L). A batch of one now looks up
its hold, locks it, then its budget counters (the same lock order as every writer, migration 0008),
and calls ``ledger_settle`` as the loop did. Answers are the same, item for item.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEDGER_SETTLE_BATCH = r"""
CREATE OR REPLACE FUNCTION public.ledger_settle_batch(p_request_ids text[], p_reservations uuid[], p_inputs bigint[], p_outputs bigint[], p_cached bigint[], p_providers text[], p_provider_models text[], p_outcomes smallint[], p_latencies bigint[], p_estimated boolean[], p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_n int := cardinality(p_request_ids);
  v_out jsonb[];
  v_i int;
  v_holds uuid[];
  v_hold uuid;
BEGIN
  IF v_n IS NULL OR v_n = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  IF cardinality(p_reservations) <> v_n OR cardinality(p_inputs) <> v_n
     OR cardinality(p_outputs) <> v_n OR cardinality(p_cached) <> v_n
     OR cardinality(p_providers) <> v_n OR cardinality(p_provider_models) <> v_n
     OR cardinality(p_outcomes) <> v_n OR cardinality(p_latencies) <> v_n
     OR cardinality(p_estimated) <> v_n THEN
    RAISE EXCEPTION 'ledger_settle_batch: arrays of different lengths';
  END IF;
  IF v_n = 1 THEN
    -- One settle (a quiet router's batch): the same locks in the same order (its hold, then the
    -- hold's counters), without the sorting and array work that only a batch of several needs.
    IF p_reservations[1] IS NOT NULL THEN
      SELECT h.id INTO v_hold FROM holds h WHERE h.id = p_reservations[1];
    ELSE
      SELECT h.id INTO v_hold FROM holds h
       WHERE h.request_id = p_request_ids[1] AND h.state = 'OPEN'
       ORDER BY h.attempt DESC LIMIT 1;
    END IF;
    IF v_hold IS NOT NULL THEN
      PERFORM 1 FROM holds h WHERE h.id = v_hold FOR NO KEY UPDATE;
      PERFORM 1 FROM budget_counters c
        WHERE (c.budget_id, c.window_start) IN (
          SELECT u.b, u.w FROM holds h, unnest(h.budget_ids, h.window_starts) AS u(b, w)
           WHERE h.id = v_hold)
        ORDER BY c.budget_id, c.window_start FOR UPDATE OF c;
    END IF;
    RETURN jsonb_build_array(ledger_settle(
      p_request_ids[1], p_reservations[1], p_inputs[1], p_outputs[1], p_cached[1],
      p_providers[1], p_provider_models[1], p_outcomes[1], p_latencies[1],
      p_estimated[1], p_now));
  END IF;
  v_out := array_fill(NULL::jsonb, ARRAY[v_n]);
  -- Every batch takes its locks in one global order: first the holds it settles (by id), then
  -- the budget counters they touch (by budget and window, as ledger_hold locks them), and only
  -- then, item by item, the rows a settle writes (entries, rollups, rate events). Two batches
  -- for one team's holds (several agents, several slices) then queue behind each other instead
  -- of deadlocking (Postgres breaks a deadlock only after deadlock_timeout, 1 s).
  SELECT array_agg(DISTINCT o.id) INTO v_holds
  FROM generate_subscripts(p_request_ids, 1) AS k(i)
  CROSS JOIN LATERAL (
    SELECT h.id FROM holds h
     WHERE (p_reservations[k.i] IS NOT NULL AND h.id = p_reservations[k.i])
        OR (p_reservations[k.i] IS NULL AND h.request_id = p_request_ids[k.i] AND h.state = 'OPEN')
     ORDER BY h.attempt DESC LIMIT 1
  ) o;
  IF v_holds IS NOT NULL THEN
    PERFORM 1 FROM holds h WHERE h.id = ANY(v_holds) ORDER BY h.id FOR NO KEY UPDATE;
    PERFORM 1 FROM budget_counters c
      WHERE (c.budget_id, c.window_start) IN (
        SELECT u.b, u.w FROM holds h, unnest(h.budget_ids, h.window_starts) AS u(b, w)
         WHERE h.id = ANY(v_holds))
      ORDER BY c.budget_id, c.window_start FOR UPDATE OF c;
  END IF;
  FOR v_i IN
    SELECT k.i
    FROM generate_subscripts(p_request_ids, 1) AS k(i)
    LEFT JOIN LATERAL (
      SELECT h.team, h.agent, h.model, h.run_id, h.id FROM holds h
       WHERE (p_reservations[k.i] IS NOT NULL AND h.id = p_reservations[k.i])
          OR (p_reservations[k.i] IS NULL AND h.request_id = p_request_ids[k.i])
       ORDER BY h.attempt DESC LIMIT 1
    ) o ON true
    ORDER BY o.team NULLS FIRST, o.agent NULLS FIRST, o.model NULLS FIRST, p_providers[k.i],
             o.run_id NULLS FIRST, o.id NULLS FIRST, p_request_ids[k.i], k.i
  LOOP
    v_out[v_i] := ledger_settle(
      p_request_ids[v_i], p_reservations[v_i], p_inputs[v_i], p_outputs[v_i], p_cached[v_i],
      p_providers[v_i], p_provider_models[v_i], p_outcomes[v_i], p_latencies[v_i],
      p_estimated[v_i], p_now);
  END LOOP;
  RETURN to_jsonb(v_out);
END
$function$
"""

LEDGER_SETTLE_BATCH_0008 = r"""
CREATE OR REPLACE FUNCTION public.ledger_settle_batch(p_request_ids text[], p_reservations uuid[], p_inputs bigint[], p_outputs bigint[], p_cached bigint[], p_providers text[], p_provider_models text[], p_outcomes smallint[], p_latencies bigint[], p_estimated boolean[], p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_n int := cardinality(p_request_ids);
  v_out jsonb[];
  v_i int;
  v_holds uuid[];
BEGIN
  IF v_n IS NULL OR v_n = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  IF cardinality(p_reservations) <> v_n OR cardinality(p_inputs) <> v_n
     OR cardinality(p_outputs) <> v_n OR cardinality(p_cached) <> v_n
     OR cardinality(p_providers) <> v_n OR cardinality(p_provider_models) <> v_n
     OR cardinality(p_outcomes) <> v_n OR cardinality(p_latencies) <> v_n
     OR cardinality(p_estimated) <> v_n THEN
    RAISE EXCEPTION 'ledger_settle_batch: arrays of different lengths';
  END IF;
  v_out := array_fill(NULL::jsonb, ARRAY[v_n]);
  -- Every batch takes its locks in one global order: first the holds it settles (by id), then
  -- the budget counters they touch (by budget and window, as ledger_hold locks them), and only
  -- then, item by item, the rows a settle writes (entries, rollups, rate events). Two batches
  -- for one team's holds (several agents, several slices) then queue behind each other instead
  -- of deadlocking (Postgres breaks a deadlock only after deadlock_timeout, 1 s).
  SELECT array_agg(DISTINCT o.id) INTO v_holds
  FROM generate_subscripts(p_request_ids, 1) AS k(i)
  CROSS JOIN LATERAL (
    SELECT h.id FROM holds h
     WHERE (p_reservations[k.i] IS NOT NULL AND h.id = p_reservations[k.i])
        OR (p_reservations[k.i] IS NULL AND h.request_id = p_request_ids[k.i] AND h.state = 'OPEN')
     ORDER BY h.attempt DESC LIMIT 1
  ) o;
  IF v_holds IS NOT NULL THEN
    PERFORM 1 FROM holds h WHERE h.id = ANY(v_holds) ORDER BY h.id FOR NO KEY UPDATE;
    PERFORM 1 FROM budget_counters c
      WHERE (c.budget_id, c.window_start) IN (
        SELECT u.b, u.w FROM holds h, unnest(h.budget_ids, h.window_starts) AS u(b, w)
         WHERE h.id = ANY(v_holds))
      ORDER BY c.budget_id, c.window_start FOR UPDATE OF c;
  END IF;
  FOR v_i IN
    SELECT k.i
    FROM generate_subscripts(p_request_ids, 1) AS k(i)
    LEFT JOIN LATERAL (
      SELECT h.team, h.agent, h.model, h.run_id, h.id FROM holds h
       WHERE (p_reservations[k.i] IS NOT NULL AND h.id = p_reservations[k.i])
          OR (p_reservations[k.i] IS NULL AND h.request_id = p_request_ids[k.i])
       ORDER BY h.attempt DESC LIMIT 1
    ) o ON true
    ORDER BY o.team NULLS FIRST, o.agent NULLS FIRST, o.model NULLS FIRST, p_providers[k.i],
             o.run_id NULLS FIRST, o.id NULLS FIRST, p_request_ids[k.i], k.i
  LOOP
    v_out[v_i] := ledger_settle(
      p_request_ids[v_i], p_reservations[v_i], p_inputs[v_i], p_outputs[v_i], p_cached[v_i],
      p_providers[v_i], p_provider_models[v_i], p_outcomes[v_i], p_latencies[v_i],
      p_estimated[v_i], p_now);
  END LOOP;
  RETURN to_jsonb(v_out);
END
$function$
"""


def upgrade() -> None:
    op.execute(LEDGER_SETTLE_BATCH)


def downgrade() -> None:
    op.execute(LEDGER_SETTLE_BATCH_0008)
