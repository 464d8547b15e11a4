"""The embedded stack: starts, checks and stops Ray, PostgreSQL, Triton and MLflow on one machine."""
