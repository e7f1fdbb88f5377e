"""geometry primitives."""
