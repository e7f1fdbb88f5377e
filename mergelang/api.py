"""The pipeline end to end: spec → checked program → plan → tensors on disk."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from .check import TORCH_NAMES, Plan, build_plan
from .diagnostics import OUTPUT_PATH, WRITE, Diagnostic, MergelangError, Reporter
from .io import ShardedWriter, atomic_output_dir, copy_model_files, free_bytes
from .io.writer import OutputTensor
from .lower import lower_file
from .record import start_record
from .stats import dare_warnings

DEFAULT_SHARD_SIZE = 5 * 1000**3


@dataclass
class RunOptions:
    seed: int = 0
    models: dict[str, Path] = field(default_factory=dict)
    dtype: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    device: str = "cpu"
    chunk: int | None = None  # elements per chunk; None: execute.DEFAULT_CHUNK
    force: bool = False
    reverse: bool = False  # evaluate tensors last to first (tests: the bytes must not change)
    compile: str | None = None  # auto | always | never; None: $MERGELANG_COMPILE or auto (fuse.py)
    threads: int | None = None  # CPU threads; None: all (execute.cpu_threads)


def parse_size(text: str) -> int:
    """'5GB' → 5_000_000_000, '500MiB' → 524_288_000, '1000' → 1000."""
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
             "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4, "K": 1000, "M": 1000**2, "G": 1000**3}
    t = text.strip().upper().replace(" ", "")
    number = t.rstrip("KMGTIB")
    unit = t[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"expected a size like 5GB or 500MB, got {text!r}") from None
    if unit not in units or value <= 0:
        raise ValueError(f"expected a size like 5GB or 500MB, got {text!r}")
    return int(value * units[unit])


def check(spec: Path, options: RunOptions, reporter: Reporter | None = None) -> Plan:
    """Every static check; returns the plan (with open checkpoints) or raises MergelangError."""
    reporter = reporter or Reporter()
    lowered = lower_file(spec, reporter)
    plan = build_plan(lowered, options.models, options.dtype, reporter)
    dare_warnings(plan, reporter)
    return plan


def _check_output_path(out: Path, plan: Plan, force: bool) -> None:
    out = out.expanduser().resolve()
    for key, ckpt in plan.checkpoints.items():
        folder = ckpt.path.resolve()
        if out == folder or out in folder.parents:
            raise MergelangError(Diagnostic(
                OUTPUT_PATH, f"the output folder {out} {'is' if out == folder else 'contains'} the input model `{key}`",
                plan.lowered.inputs[key].span, help="write the merge to a new folder"))
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise MergelangError(Diagnostic(
            OUTPUT_PATH, f"the output folder {out} already exists and is not empty",
            help="choose another folder, or pass --force to replace it"))
    need, have = plan.output_bytes, free_bytes(out.parent)
    if need > have:
        raise MergelangError(Diagnostic(
            WRITE, f"not enough disk space for the output: it needs {need / 1e9:.2f} GB, "
                   f"{have / 1e9:.2f} GB are free under {out.parent}", help="free some space or write elsewhere"))


def write_plan(plan: Plan, out: Path, options: RunOptions, progress=None) -> Path:
    """Execute the plan into `out` atomically: a temporary folder beside it, renamed when complete."""
    from .execute import DEFAULT_CHUNK, ExecOptions, execute  # the executor: checking does not need it

    out = out.expanduser().resolve()
    _check_output_path(out, plan, options.force)
    tensors = [OutputTensor(t.name, t.dtype, t.shape) for t in plan.tensors]
    dtypes = {t.dtype for t in plan.tensors}
    dtype_name = TORCH_NAMES.get(dtypes.pop()) if len(dtypes) == 1 else None
    # The inputs are hashed for the model card on a background thread while the merge runs.
    record = start_record(plan, options.seed, options.dtype, options.shard_size, options.models)
    try:
        with atomic_output_dir(out, force=options.force) as tmp:
            with ShardedWriter(tmp, tensors, options.shard_size, metadata={"format": "pt"}) as writer:
                execute(plan, writer, ExecOptions(options.seed, options.device, options.chunk or DEFAULT_CHUNK,
                                                  options.reverse, options.compile, options.threads), progress)
            copy_model_files(plan.checkpoints[plan.config_source].path, tmp, dtype_name=dtype_name,
                             config_updates=plan.config_updates,
                             tokenizer_src=plan.checkpoints[plan.tokenizer_source].path,
                             chat_template=plan.lowered.options.chat_template)
            record.write_card(tmp)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MergelangError(Diagnostic(
                WRITE, f"the disk filled up while writing {out}: {os.strerror(e.errno)}",
                notes=("nothing was written: the partial output was removed",),
                help="free some space or write elsewhere")) from None
        raise MergelangError(Diagnostic(
            WRITE, f"cannot write the output {out}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""),
            notes=("nothing was written: the partial output was removed",))) from None
    finally:
        record.cancel()  # stops the hashing thread after an error; a no-op once it is done
    return out


def run(spec: Path, out: Path, options: RunOptions, progress=None) -> Path:
    plan = check(spec, options)
    try:
        return write_plan(plan, out, options, progress)
    finally:
        plan.close()
