-- Migration 1, the baseline: control tables. Collection tables (items_<name>, parts_<name>) are created
-- per model version by es_ray.store.collections. Every statement is idempotent, so a database made by
-- an es-ray from before numbered migrations (which ran this file at every start) is brought up to date
-- by it. A later change to the schema is a new file, 0002_<what>.sql, never an edit of this one.
CREATE EXTENSION IF NOT EXISTS vector;

-- Global write counter: every item write takes the next value, so "newer" is always well defined.
CREATE SEQUENCE IF NOT EXISTS item_write_seq;

CREATE TABLE IF NOT EXISTS models (
    version      integer PRIMARY KEY,              -- MLflow registry version = Triton model version
    mlflow_uri   text NOT NULL,                    -- models:/<name>/<version>
    source_dir   text NOT NULL,                    -- local copy of the encoder dir (tokenizer lives here)
    dim          integer NOT NULL,
    max_length   integer NOT NULL,
    state        text NOT NULL DEFAULT 'registered', -- registered | deployed | retired
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS collections (
    name          text PRIMARY KEY,
    model_version integer NOT NULL REFERENCES models (version),
    state         text NOT NULL DEFAULT 'building',   -- building | ready | dropped
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- The blue pointer: exactly one row, switched in one UPDATE.
CREATE TABLE IF NOT EXISTS blue (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    model_version integer NOT NULL REFERENCES models (version),
    collection    text NOT NULL REFERENCES collections (name),
    switched_at   timestamptz NOT NULL DEFAULT now()
);

-- Clickstream. A session is one result list shown for one query; events are what the user did with it.
CREATE TABLE IF NOT EXISTS sessions (
    session_id    text PRIMARY KEY,
    user_id       text,
    query         text NOT NULL,
    model_version integer,                        -- the model that ranked the results (NULL: made elsewhere)
    irrelevant    boolean NOT NULL DEFAULT false, -- the user said no result was right
    created_at    timestamptz NOT NULL DEFAULT now(),
    improved_at   timestamptz                     -- set when the improvement loop consumed the session
);
-- Search swaps one adjacent pair of results in a share of sessions (es_ray/serve/exploration.py): the
-- upper rank of the swapped pair, so the log says which sessions were interventions.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS swapped_rank integer;
CREATE INDEX IF NOT EXISTS sessions_pending ON sessions (created_at) WHERE improved_at IS NULL;
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id, created_at) WHERE user_id IS NOT NULL;

-- What was shown, with ranks (1 = top): the position-bias correction needs them.
CREATE TABLE IF NOT EXISTS session_results (
    session_id text NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    rank       integer NOT NULL CHECK (rank >= 1),
    object_id  text NOT NULL,
    PRIMARY KEY (session_id, rank),
    UNIQUE (session_id, object_id)
);

-- Events are idempotent by event_id: a client may resend a batch after a timeout.
CREATE TABLE IF NOT EXISTS events (
    event_id   text PRIMARY KEY,
    session_id text NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    object_id  text NOT NULL,
    type       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS events_session ON events (session_id);

-- Click evidence (es_ray/store/evidence.py): anonymous sessions' impressions and clicks counted per
-- (normalised query, item, rank) by the improvement loop; click memories are derived from it.
CREATE TABLE IF NOT EXISTS click_evidence (
    query_key   text NOT NULL,
    object_id   text NOT NULL,
    rank        integer NOT NULL,
    impressions integer NOT NULL,
    clicks      integer NOT NULL,
    PRIMARY KEY (query_key, object_id, rank)
);
-- By item: memories read the queries that clicked an item; upserts and deletes drop an item's evidence.
DROP INDEX IF EXISTS click_evidence_clicked;
CREATE INDEX IF NOT EXISTS click_evidence_object ON click_evidence (object_id);
CREATE TABLE IF NOT EXISTS click_queries (
    query_key text PRIMARY KEY,
    query     text NOT NULL
);

-- Fine-tuned versions: where they came from, what they scored, what the quality gate decided.
ALTER TABLE models ADD COLUMN IF NOT EXISTS parent_version integer;
ALTER TABLE models ADD COLUMN IF NOT EXISTS metrics jsonb;
ALTER TABLE models ADD COLUMN IF NOT EXISTS gate jsonb;

-- Long-running work (fine-tune, reindex): one row per run, updated by the Ray job that does it.
CREATE TABLE IF NOT EXISTS tasks (
    task_id      text PRIMARY KEY,
    kind         text NOT NULL,                   -- fine-tune | reindex
    status       text NOT NULL DEFAULT 'pending', -- pending | running | done | failed | cancelled
    params       jsonb NOT NULL DEFAULT '{}',
    progress     jsonb NOT NULL DEFAULT '{}',
    result       jsonb,
    error        text,
    job_id       text,                            -- the Ray job's submission id
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    heartbeat_at timestamptz                      -- a running job refreshes it; a stale one means a dead job
);
-- One active task per kind: a second fine-tune while one runs is refused by the database itself.
CREATE UNIQUE INDEX IF NOT EXISTS tasks_one_active ON tasks (kind) WHERE status IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_at DESC);

-- Blue/green: while a green collection is built, and during the rollback grace period after a switch
-- (previous), every item write goes to all of them in one transaction. `epoch` counts switches.
ALTER TABLE blue ADD COLUMN IF NOT EXISTS green_version integer REFERENCES models (version);
ALTER TABLE blue ADD COLUMN IF NOT EXISTS green_collection text REFERENCES collections (name);
ALTER TABLE blue ADD COLUMN IF NOT EXISTS previous_version integer REFERENCES models (version);
ALTER TABLE blue ADD COLUMN IF NOT EXISTS previous_collection text REFERENCES collections (name);
ALTER TABLE blue ADD COLUMN IF NOT EXISTS previous_until timestamptz;
ALTER TABLE blue ADD COLUMN IF NOT EXISTS epoch integer NOT NULL DEFAULT 0;

-- Named locks with an owner and a lease: a holder that dies stops renewing, and the lock expires.
CREATE TABLE IF NOT EXISTS locks (
    name        text PRIMARY KEY,
    owner       text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

-- Switches and rollbacks, recorded before they happen: a driver that dies mid-switch finds its row
-- `started` at restart and finishes it (or aborts it if blue moved meanwhile), never switching twice.
CREATE TABLE IF NOT EXISTS switches (
    switch_id       text PRIMARY KEY,
    kind            text NOT NULL,                   -- switch | rollback
    from_version    integer NOT NULL,
    from_collection text NOT NULL,
    to_version      integer NOT NULL,
    to_collection   text NOT NULL,
    status          text NOT NULL DEFAULT 'started', -- started | switched | aborted
    forced          boolean NOT NULL DEFAULT false,
    reason          text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

-- Reindex checkpoints: the blue key space cut into contiguous ranges; a range is marked done in the
-- transaction that writes its items, so a restarted reindex redoes exactly the ranges not yet done.
CREATE TABLE IF NOT EXISTS reindex_ranges (
    collection text NOT NULL,                  -- the green collection being filled
    range_no   integer NOT NULL,
    after_id   text,                           -- exclusive lower bound (NULL: from the first id)
    last_id    text,                           -- inclusive upper bound (NULL: to the last id)
    items      integer NOT NULL DEFAULT 0,     -- items written by the run that finished the range
    done_at    timestamptz,
    PRIMARY KEY (collection, range_no)
);
CREATE TABLE IF NOT EXISTS reindex_failures (
    collection text NOT NULL,
    object_id  text NOT NULL,
    stage      text NOT NULL,                  -- read | embed | write
    error      text NOT NULL,
    task_id    text,
    failed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection, object_id)
);
