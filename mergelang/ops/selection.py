"""selection primitives."""
