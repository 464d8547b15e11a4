-- Migration 8: every collection gets its lexical index (es_ray/store/lexical.py): a tsvector generated from
-- the item's text with a GIN index. New collections get it from Collection.create with the configured
-- search.text_search_config; the existing ones here with 'english', that setting's default (a migration
-- cannot read configs/stack.yaml; a reindex builds the next collection with the configured value). The
-- column is generated, so Postgres computes it for every stored row now and keeps it with every write.
-- A table of the first release's layout has no text column yet: Collection.create, which `es-ray up`
-- runs on the live collections after the migrations, adds both.
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
