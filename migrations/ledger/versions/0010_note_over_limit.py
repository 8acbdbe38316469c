"""Ledger 0010: a draw note tells the router when the slice's team is over a (lowered) limit.

A budget slice is granted against the limits of its moment. If an operator lowers a limit below
what is spent and held while a router holds slices of the team, those slices keep their grant:
their calls could go on spending past the new limit. Now ``ledger_note_draws`` still records
each draw but answers ``OVER_LIMIT`` when a budget the slice counts against has spent and held
above its limit; the router then gives the team's slices back (as when a ``Reserve`` is refused),
so its next calls take exact per-call holds and are refused where per-call holds refuse them.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEDGER_NOTE_DRAWS = r"""
CREATE OR REPLACE FUNCTION public.ledger_note_draws(p_holds uuid[], p_request_ids text[], p_amounts bigint[], p_withdrawn boolean[], p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_n int := cardinality(p_holds);
  v_out jsonb[];
  v_i int;
  v_state text;
  v_calls int;
  v_over boolean;
  v_checked uuid;  -- the slice v_over is about (draws come sorted by slice: one check per slice)
BEGIN
  IF v_n IS NULL OR v_n = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  IF cardinality(p_request_ids) <> v_n OR cardinality(p_amounts) <> v_n
     OR cardinality(p_withdrawn) <> v_n THEN
    RAISE EXCEPTION 'ledger_note_draws: arrays of different lengths';
  END IF;
  v_out := array_fill(NULL::jsonb, ARRAY[v_n]);
  -- KEY SHARE on the slices, in id order: notes run alongside the slices' settles (which take
  -- NO KEY UPDATE) but wait for a capture (FOR UPDATE), so a draw is recorded either before a
  -- capture reads the slice's draws or after it, when the slice is no longer open.
  PERFORM 1 FROM holds h WHERE h.id = ANY(p_holds) ORDER BY h.id FOR KEY SHARE;
  FOR v_i IN
    SELECT k.i FROM generate_subscripts(p_holds, 1) AS k(i)
     ORDER BY p_holds[k.i], p_request_ids[k.i], k.i
  LOOP
    SELECT h.state, h.slice_calls INTO v_state, v_calls FROM holds h WHERE h.id = p_holds[v_i];
    IF NOT FOUND THEN
      v_out[v_i] := jsonb_build_object('result', 'NOT_FOUND');
    ELSIF v_calls = 0 THEN
      v_out[v_i] := jsonb_build_object('result', 'NOT_A_SLICE');
    ELSIF p_withdrawn[v_i] THEN
      DELETE FROM slice_draws WHERE hold_id = p_holds[v_i] AND request_id = p_request_ids[v_i];
      v_out[v_i] := jsonb_build_object('result', 'OK');
    ELSIF v_state <> 'OPEN' THEN
      v_out[v_i] := jsonb_build_object('result', 'SLICE_CLOSED', 'state', v_state);
    ELSE
      INSERT INTO slice_draws (hold_id, request_id, held_nanos, noted_at)
      VALUES (p_holds[v_i], p_request_ids[v_i], p_amounts[v_i], p_now)
      ON CONFLICT (hold_id, request_id) DO NOTHING;
      -- Recorded; but if a budget the slice counts against is over its limit (lowered since the
      -- slice was granted), the router is told to give the team's slices back.
      IF v_checked IS DISTINCT FROM p_holds[v_i] THEN
        v_checked := p_holds[v_i];
        SELECT EXISTS (
          SELECT 1 FROM holds h
            CROSS JOIN LATERAL unnest(h.budget_ids, h.window_starts) AS u(budget_id, window_start)
            JOIN budgets b ON b.id = u.budget_id
            JOIN budget_counters c ON c.budget_id = u.budget_id AND c.window_start = u.window_start
           WHERE h.id = p_holds[v_i] AND c.spent_nanos::numeric + c.held_nanos > b.limit_nanos) INTO v_over;
      END IF;
      v_out[v_i] := jsonb_build_object('result', CASE WHEN v_over THEN 'OVER_LIMIT' ELSE 'OK' END);
    END IF;
  END LOOP;
  RETURN to_jsonb(v_out);
END
$function$
"""

# 0009's, for the downgrade.
LEDGER_NOTE_DRAWS_0009 = r"""
CREATE OR REPLACE FUNCTION public.ledger_note_draws(p_holds uuid[], p_request_ids text[], p_amounts bigint[], p_withdrawn boolean[], p_now timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_n int := cardinality(p_holds);
  v_out jsonb[];
  v_i int;
  v_state text;
  v_calls int;
BEGIN
  IF v_n IS NULL OR v_n = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  IF cardinality(p_request_ids) <> v_n OR cardinality(p_amounts) <> v_n
     OR cardinality(p_withdrawn) <> v_n THEN
    RAISE EXCEPTION 'ledger_note_draws: arrays of different lengths';
  END IF;
  v_out := array_fill(NULL::jsonb, ARRAY[v_n]);
  -- KEY SHARE on the slices, in id order: notes run alongside the slices' settles (which take
  -- NO KEY UPDATE) but wait for a capture (FOR UPDATE), so a draw is recorded either before a
  -- capture reads the slice's draws or after it, when the slice is no longer open.
  PERFORM 1 FROM holds h WHERE h.id = ANY(p_holds) ORDER BY h.id FOR KEY SHARE;
  FOR v_i IN
    SELECT k.i FROM generate_subscripts(p_holds, 1) AS k(i)
     ORDER BY p_holds[k.i], p_request_ids[k.i], k.i
  LOOP
    SELECT h.state, h.slice_calls INTO v_state, v_calls FROM holds h WHERE h.id = p_holds[v_i];
    IF NOT FOUND THEN
      v_out[v_i] := jsonb_build_object('result', 'NOT_FOUND');
    ELSIF v_calls = 0 THEN
      v_out[v_i] := jsonb_build_object('result', 'NOT_A_SLICE');
    ELSIF p_withdrawn[v_i] THEN
      DELETE FROM slice_draws WHERE hold_id = p_holds[v_i] AND request_id = p_request_ids[v_i];
      v_out[v_i] := jsonb_build_object('result', 'OK');
    ELSIF v_state <> 'OPEN' THEN
      v_out[v_i] := jsonb_build_object('result', 'SLICE_CLOSED', 'state', v_state);
    ELSE
      INSERT INTO slice_draws (hold_id, request_id, held_nanos, noted_at)
      VALUES (p_holds[v_i], p_request_ids[v_i], p_amounts[v_i], p_now)
      ON CONFLICT (hold_id, request_id) DO NOTHING;
      v_out[v_i] := jsonb_build_object('result', 'OK');
    END IF;
  END LOOP;
  RETURN to_jsonb(v_out);
END
$function$
"""


def upgrade() -> None:
    op.execute(LEDGER_NOTE_DRAWS)


def downgrade() -> None:
    op.execute(LEDGER_NOTE_DRAWS_0009)
