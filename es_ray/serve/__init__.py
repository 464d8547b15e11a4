"""Ray Serve: the HTTP API (search, clickstream, items, personalisation, tasks, lifecycle, health) as one
FastAPI ingress deployment, and the web page."""
