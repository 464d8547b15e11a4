-- Migration 9: which ranking a session's results came from (POST /v1/search's mode: dense, lexical or
-- hybrid) and each shown result's rank in the dense and in the lexical list (NULL: not in that list, or
-- the list was not computed), so that clicks can later tell which list deserved the weight. Sessions
-- recorded before this migration, and those POST /v1/sessions records, have no mode (NULL).
ALTER TABLE sessions ADD COLUMN mode text CHECK (mode IN ('dense', 'lexical', 'hybrid'));
ALTER TABLE session_results ADD COLUMN dense_rank integer CHECK (dense_rank >= 1);
ALTER TABLE session_results ADD COLUMN lexical_rank integer CHECK (lexical_rank >= 1);
