"""Ledger 0003: ``ledger_settle_batch``, the settles of a ``SettleBatch`` in one transaction.

The router sends the settles that finish at about the same time in one ``SettleBatch`` RPC;
this function lets the ledger write them in one round trip and one durable commit (group
commit) instead of one transaction each. Every item is still ``ledger_settle``: idempotent on
its request id, one spend entry per request id, its own result. The items are settled in a
fixed lock order (the hold's team, then agent, then request id), so two batches running at
the same time lock budget counters in the same order and cannot deadlock each other.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = r"""
CREATE FUNCTION ledger_settle_batch(
  p_request_ids text[], p_reservations uuid[], p_inputs bigint[], p_outputs bigint[],
  p_cached bigint[], p_providers text[], p_provider_models text[], p_outcomes smallint[],
  p_latencies bigint[], p_estimated boolean[], p_now timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_n int := cardinality(p_request_ids);
  v_out jsonb[];
  v_i int;
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
  FOR v_i IN
    SELECT k.i
    FROM generate_subscripts(p_request_ids, 1) AS k(i)
    LEFT JOIN LATERAL (
      SELECT h.team, h.agent FROM holds h
       WHERE (p_reservations[k.i] IS NOT NULL AND h.id = p_reservations[k.i])
          OR (p_reservations[k.i] IS NULL AND h.request_id = p_request_ids[k.i])
       ORDER BY h.attempt DESC LIMIT 1
    ) o ON true
    ORDER BY o.team NULLS FIRST, o.agent NULLS FIRST, p_request_ids[k.i], k.i
  LOOP
    v_out[v_i] := ledger_settle(
      p_request_ids[v_i], p_reservations[v_i], p_inputs[v_i], p_outputs[v_i], p_cached[v_i],
      p_providers[v_i], p_provider_models[v_i], p_outcomes[v_i], p_latencies[v_i],
      p_estimated[v_i], p_now);
  END LOOP;
  RETURN to_jsonb(v_out);
END
$$;
"""


def upgrade() -> None:
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION IF EXISTS ledger_settle_batch(text[], uuid[], bigint[], bigint[], bigint[], "
        "text[], text[], smallint[], bigint[], boolean[], timestamptz)"
    )
