"""Ledger 0006: rate limits, run budgets, a time-partitioned spend table with hourly rollups.

- ``rate_limits`` (team, agent '' = team-wide) -> requests and input+output tokens per minute.
  ``rate_events``: one row per admitted call (keyed ``c:<request id>``) or budget slice
  (``s:<slice id>``, counting every call the slice covers), with its admission time, requests
  and tokens. ``ledger_hold`` locks the team's (and agent's) ``rate_limits`` rows, sums the
  events of the last 60 s (a sliding window) and refuses with ``RATE_LIMITED`` (and when to
  retry) in the same transaction as the hold: exact across any number of router and ledger
  replicas. A call counts its worst case (prompt bound + max output) until Settle trues it up
  to what it used; Release uncounts a call that never reached a provider; a slice is granted
  only as many calls as the limits have room for, and its unused calls are uncounted when it
  is released.
- Run budgets: ``budgets.run`` (agent '' and window TOTAL), ``holds.run_id`` and
  ``spend_entries.run_id``. A Reserve naming a run with a cap creates the run's budget in its
  own transaction when there is none (no extra call); the run's budget is then one more
  counter of the same atomic hold, next to the team's and the agent's.
- ``spend_entries`` becomes a table range-partitioned by ``created_at``, one partition a
  month (``spend_entries_pYYYYMM``) plus a default partition that only ever catches rows
  outside every monthly partition. ``ledger_ensure_partitions`` creates partitions ahead
  (the ledger calls it on start and on a timer), ``ledger_drop_partitions`` drops whole
  partitions past the retention. ``request_id`` stays one entry per id: a partitioned table
  cannot have a unique index without the partition key, so settle and capture take the
  request id's advisory lock and look it up (an index probe per partition) before inserting.
- ``spend_rollup_hourly``: per hour, team, agent, model, provider and run, kept by a
  statement-level trigger on ``spend_entries`` (bulk loads roll up in one pass); partitioned by
  month like the entries (a report's range reads its months only), and kept past retention. ListSpend
  reads whole hours from it and only the partial hours at the edges from entries.

Function definitions this revision replaces are saved in ``ledger_saved_functions`` and
restored by the downgrade, whatever revision wrote them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Functions whose current definitions are replaced here (saved for the downgrade).
REPLACED = (
    "ledger_hold", "ledger_reserve", "ledger_settle", "ledger_release", "ledger_capture", "ledger_budgets",
    "ledger_set_budget", "ledger_entry_json", "ledger_hold_json",
)

SAVED = r"""
CREATE TABLE ledger_saved_functions (
  signature text PRIMARY KEY,
  definition text NOT NULL
);
"""

SCHEMA = r"""
ALTER TABLE budgets ADD COLUMN run varchar(128) NOT NULL DEFAULT '';
ALTER TABLE budgets DROP CONSTRAINT uq_budgets_team_agent_window;
ALTER TABLE budgets ADD CONSTRAINT uq_budgets_team_agent_run_window UNIQUE (team, agent, run, "window");
ALTER TABLE budgets ADD CONSTRAINT ck_budgets_run_total
  CHECK (run = '' OR (agent = '' AND "window" = 4));
ALTER TABLE holds ADD COLUMN run_id varchar(128) NOT NULL DEFAULT '';

CREATE TABLE rate_limits (
  team varchar(128) NOT NULL,
  agent varchar(128) NOT NULL DEFAULT '',
  requests_per_minute bigint NOT NULL DEFAULT 0,
  tokens_per_minute bigint NOT NULL DEFAULT 0,
  updated_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT pk_rate_limits PRIMARY KEY (team, agent),
  CONSTRAINT ck_rate_limits_limits_nonneg CHECK (requests_per_minute >= 0 AND tokens_per_minute >= 0)
);

CREATE TABLE rate_events (
  key varchar(140) NOT NULL,
  hold_id uuid NOT NULL,
  team varchar(128) NOT NULL,
  agent varchar(128) NOT NULL,
  at timestamptz NOT NULL,
  requests integer NOT NULL,
  tokens numeric NOT NULL,
  unit_tokens numeric NOT NULL,
  used_calls integer NOT NULL DEFAULT 0,
  used_tokens numeric NOT NULL DEFAULT 0,
  CONSTRAINT pk_rate_events PRIMARY KEY (key),
  CONSTRAINT ck_rate_events_counts_nonneg CHECK (requests >= 0 AND tokens >= 0 AND used_calls >= 0)
);
CREATE INDEX ix_rate_events_team_at ON rate_events (team, at);
CREATE INDEX ix_rate_events_team_agent_at ON rate_events (team, agent, at);
CREATE INDEX ix_rate_events_at ON rate_events (at);

ALTER TABLE spend_entries RENAME TO spend_entries_old;
ALTER TABLE spend_entries_old RENAME CONSTRAINT pk_spend_entries TO pk_spend_entries_old;
ALTER TABLE spend_entries_old RENAME CONSTRAINT uq_spend_entries_request_id TO uq_spend_entries_old_request_id;
ALTER INDEX ix_spend_entries_created_at_id RENAME TO ix_spend_entries_old_created_at_id;
ALTER INDEX ix_spend_entries_team_created_at_id RENAME TO ix_spend_entries_old_team_created_at_id;
ALTER TABLE spend_entries_old RENAME CONSTRAINT ck_spend_entries_tokens_valid TO ck_spend_entries_old_tokens_valid;
ALTER TABLE spend_entries_old RENAME CONSTRAINT ck_spend_entries_money_nonneg TO ck_spend_entries_old_money_nonneg;
ALTER TABLE spend_entries_old RENAME CONSTRAINT ck_spend_entries_latency_nonneg
  TO ck_spend_entries_old_latency_nonneg;

CREATE TABLE spend_entries (
  id bigint GENERATED BY DEFAULT AS IDENTITY,
  request_id varchar(128) NOT NULL,
  reservation_id uuid NOT NULL,
  team varchar(128) NOT NULL,
  agent varchar(128) NOT NULL,
  model varchar(128) NOT NULL,
  provider varchar(128) NOT NULL,
  provider_model varchar(256) NOT NULL,
  input_tokens bigint NOT NULL,
  output_tokens bigint NOT NULL,
  cached_input_tokens bigint NOT NULL,
  cost_nanos bigint NOT NULL,
  held_nanos bigint NOT NULL,
  price_version bigint NOT NULL,
  outcome smallint NOT NULL,
  flags integer NOT NULL DEFAULT 0,
  latency_us bigint NOT NULL DEFAULT 0,
  created_at timestamptz NOT NULL,
  reserve_time timestamptz NOT NULL,
  run_id varchar(128) NOT NULL DEFAULT '',
  CONSTRAINT pk_spend_entries PRIMARY KEY (id, created_at),
  CONSTRAINT ck_spend_entries_tokens_valid CHECK (input_tokens >= 0 AND output_tokens >= 0
    AND cached_input_tokens >= 0 AND cached_input_tokens <= input_tokens),
  CONSTRAINT ck_spend_entries_money_nonneg CHECK (cost_nanos >= 0 AND held_nanos >= 0),
  CONSTRAINT ck_spend_entries_latency_nonneg CHECK (latency_us >= 0)
) PARTITION BY RANGE (created_at);
CREATE INDEX ix_spend_entries_created_at_id ON spend_entries (created_at, id);
CREATE INDEX ix_spend_entries_team_created_at_id ON spend_entries (team, created_at, id);
CREATE INDEX ix_spend_entries_request_id ON spend_entries (request_id);
CREATE TABLE spend_entries_default PARTITION OF spend_entries DEFAULT;

CREATE TABLE spend_rollup_hourly (
  hour timestamptz NOT NULL,
  team varchar(128) NOT NULL,
  agent varchar(128) NOT NULL,
  model varchar(128) NOT NULL,
  provider varchar(128) NOT NULL,
  run_id varchar(128) NOT NULL,
  request_count bigint NOT NULL,
  input_tokens numeric NOT NULL,
  output_tokens numeric NOT NULL,
  cached_input_tokens numeric NOT NULL,
  cost_nanos numeric NOT NULL,
  CONSTRAINT pk_spend_rollup_hourly PRIMARY KEY (hour, team, agent, model, provider, run_id)
) PARTITION BY RANGE (hour);
CREATE INDEX ix_spend_rollup_hourly_team_hour ON spend_rollup_hourly (team, hour);
CREATE TABLE spend_rollup_hourly_default PARTITION OF spend_rollup_hourly DEFAULT;
"""

FUNCTIONS = r"""
-- The UTC hour containing p_ts.
CREATE FUNCTION ledger_hour(p_ts timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT date_trunc('hour', p_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
$$;

-- Adds a statement's new entries to the hourly rollup (one pass per statement: a bulk load
-- rolls up as one GROUP BY). Rows are upserted in key order so concurrent settles never deadlock.
CREATE FUNCTION ledger_rollup_entries() RETURNS trigger LANGUAGE plpgsql AS $$
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
$$;

CREATE TRIGGER trg_spend_entries_rollup AFTER INSERT ON spend_entries
  REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT EXECUTE FUNCTION ledger_rollup_entries();

-- The monthly partition containing p_ts: its name and bounds.
CREATE FUNCTION ledger_partition_name(p_month timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT 'spend_entries_p' || to_char(p_month AT TIME ZONE 'UTC', 'YYYYMM')
$$;

-- Creates one monthly partition of a range-partitioned table if it is missing. Rows of that
-- month that landed in the default partition (a clock far off, a partition not yet made) move
-- into it.
CREATE FUNCTION ledger_create_month_partition(
  p_parent text, p_default text, p_column text, p_name text, p_lo timestamptz, p_hi timestamptz
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
  v_moving boolean;
BEGIN
  IF to_regclass(p_name) IS NOT NULL THEN
    RETURN false;
  END IF;
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE %I >= %L AND %I < %L)',
                 p_default, p_column, p_lo, p_column, p_hi) INTO STRICT v_moving;
  IF v_moving THEN
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', p_name, p_parent);
    EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= %L AND %I < %L RETURNING *)'
                   ' INSERT INTO %I SELECT * FROM moved', p_default, p_column, p_lo, p_column, p_hi, p_name);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', p_parent, p_name, p_lo, p_hi);
  ELSE
    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)', p_name, p_parent, p_lo, p_hi);
  END IF;
  RETURN true;
END
$$;

-- Creates the spend-entry partition of the month containing p_month, and the rollup's, if
-- missing; true when the entries' partition was created.
CREATE FUNCTION ledger_create_partition(p_month timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  v_lo timestamptz := ledger_window_start(3::smallint, p_month);
  v_hi timestamptz := ledger_window_end(3::smallint, ledger_window_start(3::smallint, p_month));
  v_suffix text := to_char(v_lo AT TIME ZONE 'UTC', 'YYYYMM');
BEGIN
  PERFORM ledger_create_month_partition('spend_rollup_hourly', 'spend_rollup_hourly_default', 'hour',
                                        'spend_rollup_hourly_p' || v_suffix, v_lo, v_hi);
  RETURN ledger_create_month_partition('spend_entries', 'spend_entries_default', 'created_at',
                                       ledger_partition_name(v_lo), v_lo, v_hi);
END
$$;

-- Creates the partitions of the month containing p_now and the p_ahead months after it.
-- One maintainer at a time across replicas (a transaction-level advisory lock).
CREATE FUNCTION ledger_ensure_partitions(p_now timestamptz, p_ahead int) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
  v_month timestamptz := ledger_window_start(3::smallint, p_now);
  v_created text[] := '{}';
  i int;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended('ledger-partitions', 0));
  FOR i IN 0 .. greatest(p_ahead, 0) LOOP
    IF ledger_create_partition(v_month) THEN
      v_created := v_created || ledger_partition_name(v_month);
    END IF;
    v_month := ledger_window_end(3::smallint, v_month);
  END LOOP;
  RETURN v_created;
END
$$;

-- Every monthly partition attached to spend_entries: (name, lower bound, upper bound).
CREATE FUNCTION ledger_partitions() RETURNS TABLE (name text, lo timestamptz, hi timestamptz)
LANGUAGE sql STABLE AS $$
  SELECT c.relname::text,
         to_timestamp(substr(c.relname, 16), 'YYYYMM') AT TIME ZONE current_setting('TimeZone')
           AT TIME ZONE 'UTC',
         ledger_window_end(3::smallint, to_timestamp(substr(c.relname, 16), 'YYYYMM')
           AT TIME ZONE current_setting('TimeZone') AT TIME ZONE 'UTC')
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
   WHERE i.inhparent = 'spend_entries'::regclass AND c.relname ~ '^spend_entries_p[0-9]{6}$'
   ORDER BY 1
$$;

-- Drops whole partitions whose every row is older than p_cutoff (no row-by-row delete), and
-- deletes such rows from the default partition (which normally holds none).
CREATE FUNCTION ledger_drop_partitions(p_cutoff timestamptz) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
  v_dropped text[] := '{}';
  p record;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended('ledger-partitions', 0));
  FOR p IN SELECT * FROM ledger_partitions() WHERE hi <= p_cutoff ORDER BY lo LOOP
    EXECUTE format('ALTER TABLE spend_entries DETACH PARTITION %I', p.name);
    EXECUTE format('DROP TABLE %I', p.name);
    v_dropped := v_dropped || p.name;
  END LOOP;
  DELETE FROM spend_entries_default WHERE created_at < p_cutoff;
  RETURN v_dropped;
END
$$;

CREATE OR REPLACE FUNCTION ledger_entry_json(e spend_entries) RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object(
    'id', e.id, 'request_id', e.request_id, 'reservation_id', e.reservation_id,
    'team', e.team, 'agent', e.agent, 'model', e.model, 'provider', e.provider,
    'provider_model', e.provider_model, 'input', e.input_tokens, 'output', e.output_tokens,
    'cached', e.cached_input_tokens, 'cost', e.cost_nanos, 'held', e.held_nanos,
    'price_version', e.price_version, 'outcome', e.outcome, 'flags', e.flags,
    'latency_us', e.latency_us, 'created_us', ledger_us(e.created_at),
    'reserve_us', ledger_us(e.reserve_time), 'run_id', e.run_id)
$$;

CREATE OR REPLACE FUNCTION ledger_hold_json(h holds) RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object(
    'id', h.id, 'request_id', h.request_id, 'attempt', h.attempt, 'team', h.team,
    'agent', h.agent, 'model', h.model, 'amount', h.amount_nanos,
    'price_version', h.price_version, 'state', h.state, 'slice_calls', h.slice_calls,
    'created_us', ledger_us(h.created_at), 'expires_us', ledger_us(h.expires_at), 'run_id', h.run_id)
$$;

-- The budgets that apply to (team, agent, run) in the windows containing p_now. p_agent ''
-- gives the team-wide budgets; p_run '' leaves run budgets out.
CREATE FUNCTION ledger_budgets(p_team text, p_agent text, p_run text, p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
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
$$;

DROP FUNCTION ledger_budgets(text, text, timestamptz);

-- How long until a refused call could pass: the time until enough of the window's counted
-- requests (p_need_req) and tokens (p_need_tok) have left the 60 s window.
CREATE FUNCTION ledger_rate_retry_us(
  p_team text, p_agent text, p_now timestamptz, p_need_req numeric, p_need_tok numeric
) RETURNS bigint LANGUAGE sql STABLE AS $$
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
$$;

-- Places a hold: for one call (p_calls = 0, Reserve) or a budget slice of up to p_calls such
-- calls (AcquireSlice), optionally for a run (p_run) whose budget a first request with a cap
-- (p_run_cap > 0) creates. Checks every budget (team, agent, run) and then the team's and the
-- agent's rate limits, in one transaction. A slice is granted for as many calls as every budget
-- and every rate limit has room for, at most p_calls and at least one.
CREATE FUNCTION ledger_hold(
  p_hold_id uuid, p_request_id text, p_attempt int, p_team text, p_agent text, p_model text,
  p_provider text, p_prompt bigint, p_max_out bigint, p_calls int, p_ttl_us bigint, p_now timestamptz,
  p_run text, p_run_cap bigint
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_hold holds%ROWTYPE;
  v_version bigint;
  v_in bigint;
  v_out bigint;
  v_cost numeric;
  v_unit bigint;
  v_amount bigint;
  v_granted int := 0;
  v_room numeric := NULL;
  v_ids bigint[];
  v_wins smallint[];
  v_starts timestamptz[];
  v_n int;
  v_locked int;
  r record;
  rl record;
  v_status jsonb := '[]'::jsonb;
  v_denied jsonb := NULL;
  v_key text := CASE WHEN p_calls > 0 THEN 's:' ELSE 'c:' END || p_request_id;
  v_unit_tokens numeric := p_prompt::numeric + p_max_out;
  v_limited boolean := false;
  v_rate_calls numeric := NULL;
  v_allow numeric;
  v_req numeric;
  v_tok numeric;
BEGIN
  -- Shared by every hold of the team, exclusive in ledger_set_budget: a budget created
  -- mid-window is never created while one of the team's holds is being placed.
  PERFORM pg_advisory_xact_lock_shared(ledger_team_lock_key(p_team));
  -- One hold placement per request id at a time, and never after its call was released as a
  -- whole (ledger_release_request takes the same lock): a Reserve still in flight when the
  -- router gave up creates nothing.
  PERFORM pg_advisory_xact_lock(ledger_request_lock_key(p_request_id));
  IF EXISTS (SELECT 1 FROM request_releases WHERE request_id = p_request_id) THEN
    RETURN jsonb_build_object('result', 'REQUEST_RELEASED');
  END IF;
  SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id AND attempt = p_attempt;
  IF FOUND THEN
    IF (v_hold.team, v_hold.agent, v_hold.model, v_hold.prompt_tokens, v_hold.max_output_tokens,
        v_hold.slice_calls > 0, v_hold.run_id)
       IS DISTINCT FROM (p_team, p_agent, p_model, p_prompt, p_max_out, p_calls > 0, p_run) THEN
      RETURN jsonb_build_object('result', 'MISMATCH');
    END IF;
    RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'hold', ledger_hold_json(v_hold),
                              'budgets', ledger_budgets(p_team, p_agent, p_run, p_now));
  END IF;
  IF EXISTS (SELECT 1 FROM spend_entries WHERE request_id = p_request_id) THEN
    RETURN jsonb_build_object('result', 'ALREADY_SETTLED');
  END IF;

  SELECT max(version) INTO v_version FROM price_versions;
  SELECT input_per_mtok_nanos, output_per_mtok_nanos INTO v_in, v_out
    FROM prices WHERE version = v_version AND model = p_model;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('result', 'NOT_PRICED', 'price_version', coalesce(v_version, 0));
  END IF;
  v_cost := ledger_cost(p_prompt, 0, p_max_out, v_in, 0, v_out);
  IF v_cost * greatest(p_calls, 1) > 4611686018427387904 THEN
    RETURN jsonb_build_object('result', 'COST_OVERFLOW');
  END IF;
  v_unit := v_cost::bigint;
  v_amount := v_unit;

  -- A run named with a cap gets its budget here, in this transaction, when it has none: no
  -- extra call. Racing first requests both succeed (the loser's insert does nothing).
  IF p_run <> '' AND p_run_cap > 0
     AND NOT EXISTS (SELECT 1 FROM budgets WHERE team = p_team AND agent = '' AND run = p_run
                     AND "window" = 4) THEN
    INSERT INTO teams (name) VALUES (p_team) ON CONFLICT DO NOTHING;
    INSERT INTO budgets (team, agent, run, "window", limit_nanos, soft_limit_nanos, updated_at)
    VALUES (p_team, '', p_run, 4, p_run_cap, 0, p_now) ON CONFLICT DO NOTHING;
  END IF;

  SELECT coalesce(array_agg(id ORDER BY id), '{}'),
         coalesce(array_agg("window" ORDER BY id), '{}'),
         coalesce(array_agg(ledger_window_start("window", p_now) ORDER BY id), '{}')
    INTO v_ids, v_wins, v_starts
    FROM budgets WHERE team = p_team AND agent IN ('', p_agent) AND run IN ('', p_run);
  v_n := cardinality(v_ids);
  -- No budget applies: refused unless the operator allows unbudgeted teams (the ledger sets
  -- igw.allow_unbudgeted on its connections from IGW_LEDGER_ALLOW_UNBUDGETED).
  IF v_n = 0 AND coalesce(current_setting('igw.allow_unbudgeted', true), '') <> 'on' THEN
    RETURN jsonb_build_object('result', 'NO_BUDGET', 'price_version', v_version);
  END IF;

  IF v_n > 0 THEN
    -- ORDER BY is applied before the row locks: counters are locked in key order.
    PERFORM 1 FROM budget_counters c
      JOIN unnest(v_ids, v_starts) AS k(b, w) ON c.budget_id = k.b AND c.window_start = k.w
      ORDER BY c.budget_id, c.window_start FOR UPDATE OF c;
    GET DIAGNOSTICS v_locked = ROW_COUNT;
    IF v_locked < v_n THEN
      -- A new team or window: create the missing counters (racing creators both succeed),
      -- then lock them all.
      INSERT INTO budget_counters (budget_id, window_start)
        SELECT k.b, k.w FROM unnest(v_ids, v_starts) AS k(b, w) ORDER BY k.b, k.w
        ON CONFLICT DO NOTHING;
      PERFORM 1 FROM budget_counters c
        JOIN unnest(v_ids, v_starts) AS k(b, w) ON c.budget_id = k.b AND c.window_start = k.w
        ORDER BY c.budget_id, c.window_start FOR UPDATE OF c;
    END IF;
    -- A concurrent duplicate of this very request may have committed while we waited.
    SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id AND attempt = p_attempt;
    IF FOUND THEN
      RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'hold', ledger_hold_json(v_hold),
                                'budgets', ledger_budgets(p_team, p_agent, p_run, p_now));
    END IF;
    FOR r IN
      SELECT b.team, b.agent, b.run, b."window", b.limit_nanos, b.soft_limit_nanos,
             c.spent_nanos, c.held_nanos, c.window_start
        FROM budget_counters c
        JOIN unnest(v_ids, v_starts) AS k(b, w) ON c.budget_id = k.b AND c.window_start = k.w
        JOIN budgets b ON b.id = c.budget_id
       ORDER BY c.budget_id, c.window_start
    LOOP
      -- One call must fit every budget (a slice too: at least one call).
      IF r.spent_nanos::numeric + r.held_nanos + v_unit > r.limit_nanos THEN
        IF v_denied IS NULL THEN
          v_denied := jsonb_build_object(
            'team', r.team, 'agent', r.agent, 'run', r.run, 'window', r."window", 'limit', r.limit_nanos,
            'soft', r.soft_limit_nanos, 'spent', r.spent_nanos, 'held', r.held_nanos,
            'start_us', ledger_us(r.window_start));
        END IF;
      END IF;
      v_room := least(v_room, r.limit_nanos::numeric - r.spent_nanos - r.held_nanos);
      v_status := v_status || jsonb_build_object(
        'team', r.team, 'agent', r.agent, 'run', r.run, 'window', r."window", 'limit', r.limit_nanos,
        'soft', r.soft_limit_nanos, 'spent', r.spent_nanos, 'held', r.held_nanos + v_unit,
        'start_us', ledger_us(r.window_start));
    END LOOP;
    IF v_denied IS NOT NULL THEN
      RETURN jsonb_build_object('result', 'DENIED', 'budget', v_denied, 'amount', v_unit,
                                'price_version', v_version);
    END IF;
  END IF;

  -- Rate limits: the team's row, then the agent's, locked ('' sorts first). Every hold of a
  -- limited team passes here one at a time, so the sums over the last 60 s are exact across
  -- replicas. This request's own earlier attempt (same key) is replaced, not added.
  FOR rl IN
    SELECT * FROM rate_limits WHERE team = p_team AND agent IN ('', p_agent) ORDER BY agent FOR UPDATE
  LOOP
    v_limited := true;
    SELECT coalesce(sum(e.requests), 0), coalesce(sum(e.tokens), 0) INTO v_req, v_tok
      FROM rate_events e
     WHERE e.team = p_team AND (rl.agent = '' OR e.agent = rl.agent)
       AND e.at > p_now - interval '60 seconds' AND e.key <> v_key;
    v_allow := NULL;
    IF rl.requests_per_minute > 0 THEN
      v_allow := rl.requests_per_minute - v_req;
    END IF;
    IF rl.tokens_per_minute > 0 THEN
      IF v_unit_tokens > rl.tokens_per_minute THEN
        RETURN jsonb_build_object('result', 'RATE_TOO_LARGE', 'agent', rl.agent,
                                  'tpm', rl.tokens_per_minute, 'tokens', v_unit_tokens);
      END IF;
      IF v_unit_tokens > 0 THEN
        v_allow := least(v_allow, floor((rl.tokens_per_minute - v_tok) / v_unit_tokens));
      END IF;
    END IF;
    IF v_allow IS NOT NULL AND v_allow < 1 THEN
      RETURN jsonb_build_object(
        'result', 'RATE_LIMITED', 'agent', rl.agent, 'rpm', rl.requests_per_minute,
        'tpm', rl.tokens_per_minute, 'requests', v_req, 'tokens', v_tok,
        'retry_us', ledger_rate_retry_us(
          p_team, rl.agent, p_now,
          CASE WHEN rl.requests_per_minute > 0 THEN greatest(v_req + 1 - rl.requests_per_minute, 0) ELSE 0 END,
          CASE WHEN rl.tokens_per_minute > 0
               THEN greatest(v_tok + v_unit_tokens - rl.tokens_per_minute, 0) ELSE 0 END));
    END IF;
    v_rate_calls := least(v_rate_calls, v_allow);
  END LOOP;

  IF p_calls > 0 THEN
    -- A slice: as many calls as the tightest budget and rate limit have room for, at most p_calls.
    v_granted := CASE WHEN v_room IS NULL OR v_unit = 0 THEN p_calls
                      ELSE least(p_calls::numeric, div(v_room, v_unit))::int END;
    v_granted := least(v_granted::numeric, coalesce(v_rate_calls, v_granted))::int;
    v_amount := v_unit * v_granted;
    IF v_granted > 1 THEN
      SELECT coalesce(jsonb_agg(s || jsonb_build_object(
               'held', (s->>'held')::bigint + v_amount - v_unit)), '[]'::jsonb)
        INTO v_status FROM jsonb_array_elements(v_status) AS s;
    END IF;
  END IF;

  INSERT INTO holds (id, request_id, attempt, team, agent, model, provider, prompt_tokens,
                     max_output_tokens, amount_nanos, price_version, budget_ids, window_starts,
                     state, created_at, expires_at, slice_calls, run_id)
  VALUES (p_hold_id, p_request_id, p_attempt, p_team, p_agent, p_model, p_provider, p_prompt,
          p_max_out, v_amount, v_version, v_ids, v_starts, 'OPEN', p_now,
          p_now + make_interval(secs => p_ttl_us / 1000000.0), v_granted, p_run)
  ON CONFLICT (request_id, attempt) DO NOTHING
  RETURNING * INTO v_hold;
  IF NOT FOUND THEN
    -- Only reachable without budgets or limits (no lock serialises duplicates).
    SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id AND attempt = p_attempt;
    RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'hold', ledger_hold_json(v_hold),
                              'budgets', ledger_budgets(p_team, p_agent, p_run, p_now));
  END IF;

  IF v_limited THEN
    INSERT INTO rate_events AS e (key, hold_id, team, agent, at, requests, tokens, unit_tokens)
    VALUES (v_key, v_hold.id, p_team, p_agent, p_now, greatest(v_granted, 1),
            v_unit_tokens * greatest(v_granted, 1), v_unit_tokens)
    ON CONFLICT (key) DO UPDATE SET hold_id = EXCLUDED.hold_id, at = EXCLUDED.at,
      requests = EXCLUDED.requests, tokens = EXCLUDED.tokens, unit_tokens = EXCLUDED.unit_tokens,
      used_calls = 0, used_tokens = 0;
  END IF;

  IF v_n > 0 AND v_amount > 0 THEN
    UPDATE budget_counters c SET held_nanos = c.held_nanos + v_amount
      FROM unnest(v_ids, v_starts) AS k(b, w)
     WHERE c.budget_id = k.b AND c.window_start = k.w;
  END IF;
  RETURN jsonb_build_object('result', 'OK', 'replayed', false, 'hold', ledger_hold_json(v_hold),
                            'budgets', v_status);
END
$$;

DROP FUNCTION ledger_hold(uuid, text, int, text, text, text, text, bigint, bigint, int, bigint, timestamptz);

CREATE OR REPLACE FUNCTION ledger_reserve(
  p_hold_id uuid, p_request_id text, p_attempt int, p_team text, p_agent text, p_model text,
  p_provider text, p_prompt bigint, p_max_out bigint, p_ttl_us bigint, p_now timestamptz
) RETURNS jsonb LANGUAGE sql AS $$
  SELECT ledger_hold(p_hold_id, p_request_id, p_attempt, p_team, p_agent, p_model, p_provider,
                     p_prompt, p_max_out, 0, p_ttl_us, p_now, '', 0)
$$;

-- Rate accounting when a hold closes. A call settled: it counts what it used. A call released
-- (it never reached a provider): it no longer counts. A slice's call settled: the slice counts
-- its used calls at what they used and its other calls at their worst case; a slice released:
-- only its used calls count. Only the event of this very hold is touched (a later attempt of
-- the same request has replaced it otherwise).
CREATE FUNCTION ledger_rate_close(p_h holds, p_settled boolean, p_tokens numeric) RETURNS void
LANGUAGE plpgsql AS $$
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
$$;

-- Forgets rate events that left every window; returns how many.
CREATE FUNCTION ledger_prune_rate_events(p_now timestamptz) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
  v_n int;
BEGIN
  DELETE FROM rate_events WHERE at < p_now - interval '5 minutes';
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;

-- The team's (and its agents') limits with what the last 60 s counted.
CREATE FUNCTION ledger_rate_limits(p_team text, p_now timestamptz) RETURNS jsonb LANGUAGE sql STABLE AS $$
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
$$;

-- SetBudget for a team, an agent or a run (p_run: agent '' and window TOTAL). As 0002: a budget
-- created mid-window starts from the spend and open holds it would have counted.
CREATE FUNCTION ledger_set_budget(
  p_team text, p_agent text, p_run text, p_window smallint, p_limit bigint, p_soft bigint, p_now timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_b budgets%ROWTYPE;
  v_start timestamptz;
  v_end timestamptz;
  v_held bigint;
BEGIN
  PERFORM pg_advisory_xact_lock(ledger_team_lock_key(p_team));
  INSERT INTO teams (name) VALUES (p_team) ON CONFLICT DO NOTHING;
  INSERT INTO budgets (team, agent, run, "window", limit_nanos, soft_limit_nanos, updated_at)
  VALUES (p_team, p_agent, p_run, p_window, p_limit, p_soft, p_now)
  ON CONFLICT (team, agent, run, "window") DO UPDATE SET limit_nanos = EXCLUDED.limit_nanos,
    soft_limit_nanos = EXCLUDED.soft_limit_nanos, updated_at = EXCLUDED.updated_at
  RETURNING * INTO v_b;
  v_start := ledger_window_start(p_window, p_now);
  v_end := ledger_window_end(p_window, v_start);

  WITH attached AS (
    UPDATE holds h
       SET budget_ids = h.budget_ids || v_b.id, window_starts = h.window_starts || v_start
     WHERE h.team = p_team AND (p_agent = '' OR h.agent = p_agent) AND (p_run = '' OR h.run_id = p_run)
       AND h.state = 'OPEN' AND h.created_at >= v_start AND h.created_at < v_end
       AND NOT (v_b.id = ANY (h.budget_ids))
    RETURNING h.amount_nanos)
  SELECT coalesce(sum(amount_nanos), 0)::bigint INTO v_held FROM attached;

  IF EXISTS (SELECT 1 FROM budget_counters WHERE budget_id = v_b.id AND window_start = v_start) THEN
    IF v_held > 0 THEN
      UPDATE budget_counters SET held_nanos = held_nanos + v_held
       WHERE budget_id = v_b.id AND window_start = v_start;
    END IF;
  ELSE
    -- Entries count in the window of their reservation, as holds do.
    INSERT INTO budget_counters (budget_id, window_start, spent_nanos, held_nanos)
    SELECT v_b.id, v_start, coalesce(sum(e.cost_nanos), 0), v_held
      FROM spend_entries e
     WHERE e.team = p_team AND (p_agent = '' OR e.agent = p_agent) AND (p_run = '' OR e.run_id = p_run)
       AND e.created_at >= v_start AND e.reserve_time >= v_start AND e.reserve_time < v_end;
  END IF;

  UPDATE budget_counters SET soft_crossed = false
   WHERE budget_id = v_b.id AND soft_crossed AND (p_soft = 0 OR spent_nanos < p_soft);
  RETURN jsonb_build_object(
    'team', v_b.team, 'agent', v_b.agent, 'run', v_b.run, 'window', v_b."window",
    'limit', v_b.limit_nanos, 'soft', v_b.soft_limit_nanos, 'updated_us', ledger_us(v_b.updated_at));
END
$$;

DROP FUNCTION ledger_set_budget(text, text, smallint, bigint, bigint, timestamptz);

-- Settle, as 0004, on the partitioned table: one entry per request id is kept by the request
-- id's advisory lock and a lookup (no unique index can span partitions); the call's rate event
-- is trued up to what it used; the entry carries the hold's run.
CREATE OR REPLACE FUNCTION ledger_settle(
  p_request_id text, p_reservation uuid, p_input bigint, p_output bigint, p_cached bigint,
  p_provider text, p_provider_model text, p_outcome smallint, p_latency_us bigint,
  p_estimated boolean, p_now timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_e spend_entries%ROWTYPE;
  v_h holds%ROWTYPE;
  v_p prices%ROWTYPE;
  v_cost numeric;
  v_flags int;
  v_n int;
  v_was_open boolean;
  v_crossings jsonb;
  v_settled boolean;
  v_slice boolean := false;
  v_drawn bigint;
BEGIN
  SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
  v_settled := FOUND;
  IF NOT v_settled THEN
    IF p_reservation IS NULL THEN
      -- By request id alone: the open hold of the latest attempt.
      SELECT * INTO v_h FROM holds WHERE request_id = p_request_id AND state = 'OPEN'
       ORDER BY attempt DESC LIMIT 1 FOR UPDATE;
      IF NOT FOUND THEN
        SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
        IF NOT FOUND THEN
          RETURN jsonb_build_object('result', 'NO_OPEN_HOLD');
        END IF;
        v_settled := true;
      END IF;
    ELSE
      SELECT * INTO v_h FROM holds WHERE id = p_reservation FOR UPDATE;
      IF NOT FOUND THEN
        RETURN jsonb_build_object('result', 'NOT_FOUND');
      END IF;
      v_slice := v_h.slice_calls > 0;
      IF v_h.request_id <> p_request_id AND NOT v_slice THEN
        RETURN jsonb_build_object('result', 'RESERVATION_MISMATCH');
      END IF;
      IF v_slice AND v_h.request_id = p_request_id THEN
        RETURN jsonb_build_object('result', 'RESERVATION_MISMATCH');
      END IF;
    END IF;
    IF NOT v_settled THEN
      -- One entry per request id: serialise every writer of this id, then look again.
      PERFORM pg_advisory_xact_lock(ledger_request_lock_key(p_request_id));
      SELECT * INTO v_e FROM spend_entries WHERE request_id = p_request_id;
      v_settled := FOUND;
      IF v_settled AND v_e.reservation_id <> v_h.id THEN
        -- Another attempt's hold of the same request settled first.
        RETURN jsonb_build_object('result', 'MISMATCH');
      END IF;
    END IF;
  END IF;

  IF v_settled THEN
    IF p_reservation IS NOT NULL AND v_e.reservation_id <> p_reservation THEN
      RETURN jsonb_build_object('result', 'MISMATCH');
    END IF;
    IF v_e.flags & 2 = 2 THEN
      RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'captured', true,
                                'entry', ledger_entry_json(v_e));
    END IF;
    IF (v_e.input_tokens, v_e.output_tokens, v_e.cached_input_tokens, v_e.provider,
        v_e.provider_model, v_e.outcome, (v_e.flags & 4 = 4))
       IS DISTINCT FROM (p_input, p_output, p_cached, p_provider, p_provider_model, p_outcome,
                         p_estimated) THEN
      RETURN jsonb_build_object('result', 'MISMATCH');
    END IF;
    RETURN jsonb_build_object('result', 'OK', 'replayed', true, 'entry', ledger_entry_json(v_e));
  END IF;

  SELECT * INTO v_p FROM prices WHERE version = v_h.price_version AND model = v_h.model;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('result', 'NOT_PRICED', 'price_version', v_h.price_version);
  END IF;
  v_cost := ledger_cost(p_input, p_cached, p_output, v_p.input_per_mtok_nanos,
                        v_p.cached_input_per_mtok_nanos, v_p.output_per_mtok_nanos);
  IF v_cost > 4611686018427387904 THEN
    RETURN jsonb_build_object('result', 'COST_OVERFLOW');
  END IF;
  v_was_open := v_h.state = 'OPEN';
  IF v_slice THEN
    v_drawn := CASE WHEN v_was_open THEN least(v_cost, v_h.amount_nanos)::bigint ELSE 0 END;
    v_flags := (CASE WHEN v_cost > v_drawn AND v_was_open THEN 1 ELSE 0 END)
             | (CASE WHEN p_estimated THEN 4 ELSE 0 END);
  ELSE
    v_drawn := CASE WHEN v_was_open THEN v_h.amount_nanos ELSE 0 END;
    v_flags := (CASE WHEN v_cost > v_h.amount_nanos THEN 1 ELSE 0 END)
             | (CASE WHEN p_estimated THEN 4 ELSE 0 END);
  END IF;

  INSERT INTO spend_entries (request_id, reservation_id, team, agent, model, provider,
                             provider_model, input_tokens, output_tokens, cached_input_tokens,
                             cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
                             created_at, reserve_time, run_id)
  VALUES (p_request_id, v_h.id, v_h.team, v_h.agent, v_h.model, p_provider,
          p_provider_model, p_input, p_output, p_cached, v_cost::bigint,
          CASE WHEN v_slice THEN v_drawn ELSE v_h.amount_nanos END,
          v_h.price_version, p_outcome, v_flags, p_latency_us, p_now, v_h.created_at, v_h.run_id)
  RETURNING * INTO v_e;

  IF v_slice THEN
    IF v_drawn > 0 THEN
      UPDATE holds SET amount_nanos = amount_nanos - v_drawn WHERE id = v_h.id;
    END IF;
  ELSE
    UPDATE holds SET state = 'SETTLED', closed_at = p_now WHERE id = v_h.id;
  END IF;
  PERFORM ledger_rate_close(v_h, true, p_input::numeric + p_output);
  v_n := cardinality(v_h.budget_ids);
  v_crossings := ledger_apply(
    v_h.budget_ids, v_h.window_starts,
    array_fill(-v_drawn, ARRAY[v_n]),
    array_fill(v_cost::bigint, ARRAY[v_n]));
  RETURN jsonb_build_object('result', 'OK', 'replayed', false, 'entry', ledger_entry_json(v_e),
                            'was_state', v_h.state, 'crossings', v_crossings,
                            'budgets', ledger_budgets(v_h.team, v_h.agent, v_h.run_id, p_now));
END
$$;

-- Release, as before, and the hold's rate event stops counting what was never used.
CREATE OR REPLACE FUNCTION ledger_release(p_id uuid, p_reason text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_h holds%ROWTYPE;
  v_n int;
BEGIN
  UPDATE holds SET state = 'RELEASED', closed_at = p_now, release_reason = p_reason
   WHERE id = p_id AND state = 'OPEN'
  RETURNING * INTO v_h;
  IF NOT FOUND THEN
    IF EXISTS (SELECT 1 FROM holds WHERE id = p_id) THEN
      RETURN jsonb_build_object('result', 'OK', 'released', false);
    END IF;
    RETURN jsonb_build_object('result', 'NOT_FOUND');
  END IF;
  v_n := cardinality(v_h.budget_ids);
  PERFORM ledger_apply(v_h.budget_ids, v_h.window_starts,
                       array_fill(-v_h.amount_nanos, ARRAY[v_n]), array_fill(0::bigint, ARRAY[v_n]));
  PERFORM ledger_rate_close(v_h, false, 0);
  RETURN jsonb_build_object('result', 'OK', 'released', true, 'team', v_h.team, 'agent', v_h.agent);
END
$$;

-- Capture, as before, on the partitioned table (one entry per request id by the request id's
-- advisory lock and a lookup); the entry carries the hold's run.
CREATE OR REPLACE FUNCTION ledger_capture(p_now timestamptz, p_limit int) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_h holds%ROWTYPE;
  v_ids bigint[] := '{}';
  v_starts timestamptz[] := '{}';
  v_held bigint[] := '{}';
  v_spent bigint[] := '{}';
  v_captured jsonb := '[]'::jsonb;
  v_freed int := 0;
  v_n int;
  v_inserted boolean;
BEGIN
  FOR v_h IN
    SELECT * FROM holds WHERE state = 'OPEN' AND expires_at <= p_now
     ORDER BY expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED
  LOOP
    PERFORM pg_advisory_xact_lock(ledger_request_lock_key(v_h.request_id));
    v_inserted := NOT EXISTS (SELECT 1 FROM spend_entries WHERE request_id = v_h.request_id);
    IF v_inserted THEN
      INSERT INTO spend_entries (request_id, reservation_id, team, agent, model, provider,
                                 provider_model, input_tokens, output_tokens, cached_input_tokens,
                                 cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
                                 created_at, reserve_time, run_id)
      VALUES (v_h.request_id, v_h.id, v_h.team, v_h.agent, v_h.model, v_h.provider, '',
              0, 0, 0, v_h.amount_nanos, v_h.amount_nanos,
              v_h.price_version, 0, 2, 0, p_now, v_h.created_at, v_h.run_id);
    END IF;
    v_n := cardinality(v_h.budget_ids);
    v_ids := v_ids || v_h.budget_ids;
    v_starts := v_starts || v_h.window_starts;
    v_held := v_held || array_fill(-v_h.amount_nanos, ARRAY[v_n]);
    IF v_inserted THEN
      UPDATE holds SET state = 'CAPTURED', closed_at = p_now WHERE id = v_h.id;
      v_spent := v_spent || array_fill(v_h.amount_nanos, ARRAY[v_n]);
      v_captured := v_captured || jsonb_build_object(
        'id', v_h.id, 'request_id', v_h.request_id, 'team', v_h.team, 'amount', v_h.amount_nanos);
    ELSE
      UPDATE holds SET state = 'RELEASED', closed_at = p_now,
                       release_reason = 'expired; request already has a spend entry'
       WHERE id = v_h.id;
      v_spent := v_spent || array_fill(0::bigint, ARRAY[v_n]);
      v_freed := v_freed + 1;
    END IF;
  END LOOP;
  RETURN jsonb_build_object('captured', v_captured, 'freed', v_freed,
                            'crossings', ledger_apply(v_ids, v_starts, v_held, v_spent));
END
$$;
"""

# The months of existing entries get their partitions before the rows move in.
MOVE_ENTRIES = r"""
DO $$
DECLARE
  m timestamptz;
BEGIN
  FOR m IN SELECT DISTINCT ledger_window_start(3::smallint, created_at) FROM spend_entries_old LOOP
    PERFORM ledger_create_partition(m);
  END LOOP;
END
$$;
INSERT INTO spend_entries (id, request_id, reservation_id, team, agent, model, provider, provider_model,
  input_tokens, output_tokens, cached_input_tokens, cost_nanos, held_nanos, price_version, outcome, flags,
  latency_us, created_at, reserve_time, run_id)
SELECT id, request_id, reservation_id, team, agent, model, provider, provider_model, input_tokens,
  output_tokens, cached_input_tokens, cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
  created_at, reserve_time, '' FROM spend_entries_old;
SELECT setval(pg_get_serial_sequence('spend_entries', 'id'),
              greatest((SELECT max(id) FROM spend_entries), 1));
DROP TABLE spend_entries_old CASCADE;
"""

DROP_NEW = r"""
DROP TRIGGER IF EXISTS trg_spend_entries_rollup ON spend_entries;
DROP FUNCTION IF EXISTS ledger_rollup_entries();
DROP FUNCTION IF EXISTS ledger_hold(uuid, text, int, text, text, text, text, bigint, bigint, int, bigint,
                                    timestamptz, text, bigint);
DROP FUNCTION IF EXISTS ledger_set_budget(text, text, text, smallint, bigint, bigint, timestamptz);
DROP FUNCTION IF EXISTS ledger_budgets(text, text, text, timestamptz);
DROP FUNCTION IF EXISTS ledger_rate_retry_us(text, text, timestamptz, numeric, numeric);
DROP FUNCTION IF EXISTS ledger_rate_close(holds, boolean, numeric);
DROP FUNCTION IF EXISTS ledger_prune_rate_events(timestamptz);
DROP FUNCTION IF EXISTS ledger_rate_limits(text, timestamptz);
DROP FUNCTION IF EXISTS ledger_drop_partitions(timestamptz);
DROP FUNCTION IF EXISTS ledger_partitions();
DROP FUNCTION IF EXISTS ledger_ensure_partitions(timestamptz, int);
DROP FUNCTION IF EXISTS ledger_create_partition(timestamptz);
DROP FUNCTION IF EXISTS ledger_create_month_partition(text, text, text, text, timestamptz, timestamptz);
DROP FUNCTION IF EXISTS ledger_partition_name(timestamptz);
DROP FUNCTION IF EXISTS ledger_hour(timestamptz);
"""

UNPARTITION = r"""
ALTER TABLE spend_entries RENAME TO spend_entries_part;
ALTER TABLE spend_entries_part RENAME CONSTRAINT pk_spend_entries TO pk_spend_entries_part;
ALTER INDEX ix_spend_entries_created_at_id RENAME TO ix_spend_entries_part_created_at_id;
ALTER INDEX ix_spend_entries_team_created_at_id RENAME TO ix_spend_entries_part_team_created_at_id;
ALTER INDEX ix_spend_entries_request_id RENAME TO ix_spend_entries_part_request_id;
ALTER TABLE spend_entries_part RENAME CONSTRAINT ck_spend_entries_tokens_valid TO ck_spend_entries_part_tokens_valid;
ALTER TABLE spend_entries_part RENAME CONSTRAINT ck_spend_entries_money_nonneg TO ck_spend_entries_part_money_nonneg;
ALTER TABLE spend_entries_part RENAME CONSTRAINT ck_spend_entries_latency_nonneg
  TO ck_spend_entries_part_latency_nonneg;
CREATE TABLE spend_entries (
  id bigint GENERATED BY DEFAULT AS IDENTITY,
  request_id varchar(128) NOT NULL,
  reservation_id uuid NOT NULL,
  team varchar(128) NOT NULL,
  agent varchar(128) NOT NULL,
  model varchar(128) NOT NULL,
  provider varchar(128) NOT NULL,
  provider_model varchar(256) NOT NULL,
  input_tokens bigint NOT NULL,
  output_tokens bigint NOT NULL,
  cached_input_tokens bigint NOT NULL,
  cost_nanos bigint NOT NULL,
  held_nanos bigint NOT NULL,
  price_version bigint NOT NULL,
  outcome smallint NOT NULL,
  flags integer NOT NULL DEFAULT 0,
  latency_us bigint NOT NULL DEFAULT 0,
  created_at timestamptz NOT NULL,
  reserve_time timestamptz NOT NULL,
  CONSTRAINT pk_spend_entries PRIMARY KEY (id),
  CONSTRAINT uq_spend_entries_request_id UNIQUE (request_id),
  CONSTRAINT ck_spend_entries_tokens_valid CHECK (input_tokens >= 0 AND output_tokens >= 0
    AND cached_input_tokens >= 0 AND cached_input_tokens <= input_tokens),
  CONSTRAINT ck_spend_entries_money_nonneg CHECK (cost_nanos >= 0 AND held_nanos >= 0),
  CONSTRAINT ck_spend_entries_latency_nonneg CHECK (latency_us >= 0)
);
CREATE INDEX ix_spend_entries_created_at_id ON spend_entries (created_at, id);
CREATE INDEX ix_spend_entries_team_created_at_id ON spend_entries (team, created_at, id);
INSERT INTO spend_entries (id, request_id, reservation_id, team, agent, model, provider, provider_model,
  input_tokens, output_tokens, cached_input_tokens, cost_nanos, held_nanos, price_version, outcome, flags,
  latency_us, created_at, reserve_time)
SELECT id, request_id, reservation_id, team, agent, model, provider, provider_model, input_tokens,
  output_tokens, cached_input_tokens, cost_nanos, held_nanos, price_version, outcome, flags, latency_us,
  created_at, reserve_time FROM spend_entries_part;
SELECT setval(pg_get_serial_sequence('spend_entries', 'id'),
              greatest((SELECT max(id) FROM spend_entries), 1));
DROP TABLE spend_entries_part CASCADE;
"""


def _save_functions() -> None:
    names = ", ".join(f"'{n}'" for n in REPLACED)
    op.execute(
        "INSERT INTO ledger_saved_functions (signature, definition)"
        " SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid) FROM pg_proc p"
        f" WHERE p.proname IN ({names}) AND p.pronamespace = 'public'::regnamespace"
    )


def upgrade() -> None:
    op.execute(SAVED)
    _save_functions()  # before the spend table is renamed: the saved text names spend_entries
    op.execute(SCHEMA)
    op.execute(FUNCTIONS)
    op.execute(MOVE_ENTRIES)


def downgrade() -> None:
    op.execute(DROP_NEW)
    op.execute(UNPARTITION)
    # Back to the saved definitions (ledger_entry_json went with the partitioned table).
    op.execute(
        """
        DO $$
        DECLARE
          f record;
        BEGIN
          FOR f IN SELECT definition FROM ledger_saved_functions ORDER BY signature LOOP
            EXECUTE f.definition;
          END LOOP;
        END
        $$;
        """
    )
    op.execute("DROP TABLE spend_rollup_hourly")
    op.execute("DROP TABLE rate_events")
    op.execute("DROP TABLE rate_limits")
    op.execute("ALTER TABLE holds DROP COLUMN run_id")
    op.execute("DELETE FROM budgets WHERE run <> ''")
    op.execute("ALTER TABLE budgets DROP CONSTRAINT ck_budgets_run_total")
    op.execute("ALTER TABLE budgets DROP CONSTRAINT uq_budgets_team_agent_run_window")
    op.execute('ALTER TABLE budgets ADD CONSTRAINT uq_budgets_team_agent_window UNIQUE (team, agent, "window")')
    op.execute("ALTER TABLE budgets DROP COLUMN run")
    op.execute("DROP TABLE ledger_saved_functions")
