-- Migration 4: what users' sessions taught, kept per (user, query, item) so that sessions can be pruned
-- (es_ray/store/retention.py) and a reindex still re-derives every user's adjustments from it
-- (es_ray/store/user_evidence.py, es_ray/improve/loop.py `rederive`).

-- One row per (user, source, query text): how many of the user's improved sessions with this query taught
-- something. The query text is what the replay embeds, so it is kept exactly as searched; it is keyed by
-- its md5 because a query of 2,048 characters would not fit in a btree key.
CREATE TABLE user_queries (
    user_id   text NOT NULL,
    source    text NOT NULL,
    query     text NOT NULL,
    query_md5 text GENERATED ALWAYS AS (md5(query)) STORED,
    sessions  integer NOT NULL,
    PRIMARY KEY (user_id, source, query_md5)
);

-- The labels of those sessions (improve/loop.py `labelled`), counted: a click, a result skipped above the
-- lowest click (`above`: the session's top click, which it should rank below), or a result of a session
-- marked irrelevant. The source stays so that learning.exclude_sources applies to the replay too.
CREATE TABLE user_evidence (
    user_id   text NOT NULL,
    source    text NOT NULL,
    query_md5 text NOT NULL,
    object_id text NOT NULL,
    kind      text NOT NULL CHECK (kind IN ('clicked', 'skipped', 'irrelevant')),
    above     text NOT NULL DEFAULT '',
    sessions  integer NOT NULL,
    PRIMARY KEY (user_id, source, query_md5, object_id, kind, above),
    FOREIGN KEY (user_id, source, query_md5) REFERENCES user_queries ON DELETE CASCADE
);

-- Retention reads sessions oldest first, consumed or not.
CREATE INDEX sessions_created ON sessions (created_at, session_id);

-- The users' sessions improved before this migration, labelled as the improvement loop labels them.
CREATE TEMP TABLE improved_labels ON COMMIT DROP AS
WITH improved AS (
    SELECT session_id, user_id, source, query, irrelevant FROM sessions
    WHERE improved_at IS NOT NULL AND user_id IS NOT NULL
), clicks AS (
    SELECT DISTINCT r.session_id, r.object_id, r.rank
    FROM improved i JOIN events e ON e.session_id = i.session_id AND e.type = 'click'
    JOIN session_results r ON r.session_id = e.session_id AND r.object_id = e.object_id
), bounds AS (
    SELECT session_id, min(rank) AS top, max(rank) AS lowest FROM clicks GROUP BY session_id
)
SELECT c.session_id, c.object_id, 'clicked' AS kind, '' AS above FROM clicks c
UNION ALL
SELECT r.session_id, r.object_id, 'skipped', t.object_id
FROM bounds b JOIN session_results r ON r.session_id = b.session_id AND r.rank < b.lowest
JOIN session_results t ON t.session_id = b.session_id AND t.rank = b.top
WHERE NOT EXISTS (SELECT 1 FROM clicks c WHERE c.session_id = r.session_id AND c.object_id = r.object_id)
UNION ALL
SELECT r.session_id, r.object_id, 'irrelevant', ''
FROM improved i JOIN session_results r ON r.session_id = i.session_id
WHERE i.irrelevant AND NOT EXISTS (SELECT 1 FROM bounds b WHERE b.session_id = i.session_id);

INSERT INTO user_queries (user_id, source, query, sessions)
SELECT s.user_id, s.source, s.query, count(DISTINCT l.session_id)
FROM improved_labels l JOIN sessions s ON s.session_id = l.session_id
GROUP BY s.user_id, s.source, s.query;

INSERT INTO user_evidence (user_id, source, query_md5, object_id, kind, above, sessions)
SELECT s.user_id, s.source, md5(s.query), l.object_id, l.kind, l.above, count(*)
FROM improved_labels l JOIN sessions s ON s.session_id = l.session_id
GROUP BY s.user_id, s.source, md5(s.query), l.object_id, l.kind, l.above;
