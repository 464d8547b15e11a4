"""Ray Serve: the HTTP API (search, items, health) as one FastAPI ingress deployment."""
