-- Migration 3: what the learners need to keep one client, or one narrow filter, from steering what everybody
-- sees (es_ray/train/learning_guards.py).

-- A search with a payload filter can show any chosen item for any query: such a session teaches only its
-- user's own vectors, never the global ranking or the fine-tune. Sessions recorded before this migration
-- did not say; they count as unfiltered, as they did.
ALTER TABLE sessions ADD COLUMN filtered boolean NOT NULL DEFAULT false;

-- The click evidence per client (the session's client, or its id where none was recorded), so that a
-- (query, item) pair teaches only once several distinct clients clicked it and one client's votes per
-- cell are capped (evidence.counts_for_queries). Counts are stored as recorded; the caps apply on reading,
-- so changing learning.* re-reads the same evidence.
-- client '': counted before this migration, when every session was its own client (a session shows an item
-- at one rank at most), so each of these impressions and clicks is one client's.
ALTER TABLE click_evidence ADD COLUMN client text NOT NULL DEFAULT '';
ALTER TABLE click_evidence ALTER COLUMN client DROP DEFAULT;
ALTER TABLE click_evidence DROP CONSTRAINT click_evidence_pkey;
ALTER TABLE click_evidence ADD PRIMARY KEY (query_key, object_id, rank, client);
