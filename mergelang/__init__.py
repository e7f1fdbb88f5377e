"""mergelang: a small declarative language for merging language-model checkpoints."""

__version__ = "0.1.0"
