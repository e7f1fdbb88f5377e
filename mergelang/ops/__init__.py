"""Primitive ops. Importing this package registers every op in OPS."""

from . import consensus, elementwise, geometry, selection, sparsify  # noqa: F401  (registers the ops)
from .registry import OPS, REQUIRED, KernelContext, OpDef, Param

__all__ = ["OPS", "REQUIRED", "KernelContext", "OpDef", "Param"]
