"""sparsify primitives."""
