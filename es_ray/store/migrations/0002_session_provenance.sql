-- Migration 2: every session says who recorded it, and event ids are unique per session, not globally.

-- source: 'served' (es-ray's own search showed the results), 'ingested' (POST /v1/sessions with an API
-- key, named in key_name), 'unverified' (POST /v1/sessions before this migration, open to anyone).
-- client: the client identity that recorded it (es_ray/serve/clients.py), NULL where unknown.
ALTER TABLE sessions ADD COLUMN source text;
ALTER TABLE sessions ADD COLUMN key_name text;
ALTER TABLE sessions ADD COLUMN client text;
-- Until now only search set model_version: a session without one came through POST /v1/sessions.
UPDATE sessions SET source = CASE WHEN model_version IS NULL THEN 'unverified' ELSE 'served' END;
ALTER TABLE sessions ALTER COLUMN source SET NOT NULL;
ALTER TABLE sessions ADD CONSTRAINT sessions_source CHECK (source IN ('served', 'ingested', 'unverified'));

-- Keyed by (session, event id): one client's predictable ids ("e-1") no longer collide with another's.
-- The primary key leads with session_id, so it also serves the per-session reads events_session did.
ALTER TABLE events DROP CONSTRAINT events_pkey;
ALTER TABLE events ADD PRIMARY KEY (session_id, event_id);
DROP INDEX IF EXISTS events_session;
