"""The lifecycle driver: a detached Ray actor that owns the blue/green state."""
