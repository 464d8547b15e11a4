-- Migration 5: when the improvement passes took over teaching users' sessions to a green collection.
-- A reindex replays the sessions improved before this moment onto green; the passes apply the ones
-- improved after it to green themselves (es_ray/improve/loop.py), so each reaches green exactly once.
-- NULL: the passes leave users' sessions to the replay (green is still loading, or was never green).
ALTER TABLE collections ADD COLUMN users_learned_since timestamptz;
