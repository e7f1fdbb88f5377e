"""Opening `lora("ADAPTER", base=MODEL)` inputs for the checker: adapter problems become diagnostics."""

from __future__ import annotations

from pathlib import Path

from .diagnostics import CORRUPT, INPUT, Reporter
from .io import Checkpoint, CheckpointError
from .io.lora import LoraAdapter


def open_lora(key: str, model, folder: Path, opened: dict[str, Checkpoint], reporter: Reporter) -> None:
    """Open the adapter `key` over its (already opened) base into `opened`, or report why not.
    A base that failed to open was reported already; its adapter is then skipped."""
    from .check import missing_help  # check imports this module

    base = opened.get(model.base_key)
    if base is None:
        return
    try:
        opened[key] = LoraAdapter.open(folder, base)
    except CheckpointError as e:
        missing = not folder.exists()
        reporter.error(INPUT if missing else CORRUPT, f"lora `{key}`: {e}", model.span, label="this adapter",
                       notes=(f"looked in {folder}",) if missing else (f"the base model is `{model.base_key}`",),
                       help=missing_help(key, model, folder) if missing else
                       "mergelang reads PEFT LoRA adapters (adapter_config.json and adapter_model.safetensors) "
                       "trained on the base model given as `base=`")
