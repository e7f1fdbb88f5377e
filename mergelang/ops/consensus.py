"""consensus primitives."""
