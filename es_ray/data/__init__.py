"""Ray Data pipelines that write items: upsert (this issue), delete and reindex (later)."""
