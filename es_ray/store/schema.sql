-- Control tables. Collection tables (items_<name>, parts_<name>) are created per model version by
-- es_ray.store.collections. Every statement is idempotent: this file runs at every start.
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
