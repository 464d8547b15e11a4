-- Migration 8: every collection gets its lexical index (es_ray/store/lexical.py): a tsvector generated from
-- the item's text with a GIN index. New collections get it from Collection.create with the configured
-- search.text_search_config; the existing ones here with 'english', that setting's default (a migration
-- cannot read configs/stack.yaml; a reindex builds the next collection with the configured value). The
-- column is generated, so Postgres computes it for every stored row now and keeps it with every write.
-- A table of the first release's layout has no text column yet: Collection.create, which `es-ray up`
-- runs on the live collections after the migrations, adds both.
-- Its cost: adding a stored column rewrites each items table and builds its GIN index under an exclusive
-- lock, in this one transaction, while the replicas of the previous `es-ray up` may still serve: their
-- searches and writes wait for it (a 503 past postgres.search_timeout_ms). Seconds for SciFact's 5,183
-- items; for a large collection, upgrade in a quiet hour.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT name FROM collections
             WHERE EXISTS (SELECT 1 FROM information_schema.columns
                           WHERE table_schema = current_schema() AND table_name = 'items_' || name
                             AND column_name = 'text')
             ORDER BY name LOOP
        EXECUTE format('ALTER TABLE %I ADD COLUMN IF NOT EXISTS lexical tsvector GENERATED ALWAYS AS '
                       '(to_tsvector(''english''::regconfig, coalesce(text, ''''))) STORED', 'items_' || c.name);
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I USING gin (lexical)',
                       'items_' || c.name || '_lexical', 'items_' || c.name);
    END LOOP;
END $$;
