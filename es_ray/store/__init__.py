"""PostgreSQL + pgvector: the one database for items, vectors, clickstream and lifecycle state."""
