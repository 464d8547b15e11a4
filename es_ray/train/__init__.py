"""Training: clickstream -> pairs, losses, metrics, Ray Tune search (metrics only so far)."""
