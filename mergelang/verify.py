"""`mergelang verify FOLDER`: re-check the inputs a merged folder's record names, re-run, compare.

In order: `read` the record from the card; `check_inputs` hashes every recorded input file again
(reading the bytes, not trusting the cache) and reports each one missing or changed by model and
file; `rerun_options` rebuilds the run from the record's spec text, seed and options; the merge is
written to a temporary folder; `compare_folders` finds the first file that differs and, in a
safetensors file, the first tensor. README.md is compared by its record (its prose may be edited).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .api import RunOptions, write_plan
from .check import build_plan
from .diagnostics import INPUT_CHANGED, RECORD, Diagnostic, MergelangError, Reporter
from .io.card import CARD_FILE, CardError, read_record
from .io.hashing import HashCache, hash_file
from .io.safetensors_format import CheckpointError, read_header
from .lower import Lowered, lower
from .parse import parse

BLOCK = 8 << 20


@dataclass(frozen=True)
class Difference:
    file: str
    detail: str
    tensor: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}: tensor `{self.tensor}`" if self.tensor else self.file
        return f"{where} {self.detail}"


def verify_folder(folder: Path, rebind: dict[str, Path], reporter: Reporter, *, device: str = "cpu",
                  tmp: Path | None = None, on_plan=None) -> Difference | None:
    """The whole check: record, input hashes, re-run into a temporary folder (under `tmp`, else the
    system's), comparison. Returns the first difference or None. `on_plan(plan)`, when given, is called
    once the re-run is planned and returns a context manager that yields a progress callback."""
    record = read(folder, reporter)
    folders = input_folders(record, rebind, reporter)
    check_inputs(record, folders, reporter)
    options = rerun_options(record, folders)
    options.device = device
    plan = build_plan(lower_recorded(record, reporter), options.models, options.dtype, reporter)
    if tmp is not None:
        tmp.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mergelang-verify-", dir=tmp))
    try:
        try:
            with (on_plan(plan) if on_plan else nullcontext()) as progress:
                rerun = write_plan(plan, work / "merged", options, progress)
        finally:
            plan.close()
        return compare_folders(folder, rerun)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read(folder: Path, reporter: Reporter) -> dict:
    try:
        record = read_record(folder)
    except CardError as e:
        raise MergelangError(Diagnostic(RECORD, str(e), help="verify reads the README.md that `mergelang run` "
                                                             "writes into its output folder")) from None
    if record["mergelang"] != __version__:
        reporter.warn(RECORD, f"the folder was made by mergelang {record['mergelang']}, this is {__version__}",
                      notes=("a different version may compute different bits (its stdlib methods or "
                             "primitives may have changed)",))
    return record


def input_folders(record: dict, rebind: dict[str, Path], reporter: Reporter) -> dict[str, Path]:
    """Each recorded input's folder, after `--model NAME=PATH` (NAME: the bound name or the path as written)."""
    folders = {i["key"]: Path(i["resolved"]) for i in record["inputs"]}
    for name, path in rebind.items():
        hits = [i["key"] for i in record["inputs"] if name in (i["key"], i["path"])]
        if not hits:
            known = ", ".join(folders) or "none"
            reporter.error(RECORD, f"--model {name}=...: the record has no model named `{name}`",
                           help=f"its models are: {known}")
        for key in hits:
            folders[key] = Path(path).expanduser().resolve()
    reporter.raise_if_errors()
    return folders


def check_inputs(record: dict, folders: dict[str, Path], reporter: Reporter) -> None:
    """Every recorded file of every input is there, with its recorded size and sha256."""
    cache = HashCache()
    for entry in record["inputs"]:
        key, folder = entry["key"], folders[entry["key"]]
        moved = f"if `{key}` moved, pass --model {key}=NEW_FOLDER"
        for f in entry["files"]:
            path = folder / f["name"]
            if not path.is_file():
                reporter.error(INPUT_CHANGED, f"model `{key}`: file {f['name']} is missing from {folder}",
                               help=moved if not folder.is_dir() else "the merge read it; restore it")
                continue
            try:
                found = hash_file(path, cache, fresh=True)
            except CheckpointError as e:
                reporter.error(INPUT_CHANGED, f"model `{key}`: {e}")
                continue
            if found.size != f["size"]:
                reporter.error(INPUT_CHANGED, f"model `{key}`: file {f['name']} changed since the merge: it had "
                                              f"{f['size']} bytes, it has {found.size}", notes=(f"in {folder}",))
            elif found.sha256 != f["sha256"]:
                reporter.error(INPUT_CHANGED, f"model `{key}`: file {f['name']} changed since the merge: its "
                                              f"sha256 was {f['sha256']}, it is {found.sha256}",
                               notes=(f"in {folder}",))
    cache.save()
    for f in record["spec"].get("files", []):  # the chat template file the spec names
        path = Path(record["spec"]["folder"]) / f["name"]
        try:
            data = path.read_bytes()
        except OSError as e:
            reporter.error(INPUT_CHANGED, f"the spec's file {f['name']} cannot be read: {e.strerror or e}",
                           notes=(f"in {path.parent}",))
            continue
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            reporter.error(INPUT_CHANGED, f"the spec's file {f['name']} changed since the merge: its sha256 was "
                                          f"{f['sha256']}, it is {hashlib.sha256(data).hexdigest()}",
                           notes=(f"in {path.parent}",))
    reporter.raise_if_errors()


def lower_recorded(record: dict, reporter: Reporter) -> Lowered:
    spec = record["spec"]
    folder = Path(spec["folder"])
    return lower(parse(spec["text"], name=str(folder / spec["name"]), folder=folder), reporter)


def rerun_options(record: dict, folders: dict[str, Path]) -> RunOptions:
    options = record["options"]
    return RunOptions(seed=record["seed"], models=dict(folders), dtype=options["dtype"],
                      shard_size=options["shard_size"])


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def compare_folders(original: Path, rerun: Path) -> Difference | None:
    """The first difference between a folder and its re-run (files in name order), or None."""
    old, new = _files(original), _files(rerun)
    for name in sorted(old | new):
        if name not in old:
            return Difference(name, "is missing: the merge writes it")
        if name not in new:
            return Difference(name, "is not written by the merge")
        if name == CARD_FILE:
            diff = _compare_records(read_record(original), read_record(rerun))
        elif _same_bytes(original / name, rerun / name):
            continue
        elif name.endswith(".safetensors"):
            diff = _first_tensor_difference(original / name, rerun / name, name)
        else:
            diff = Difference(name, "differs")
        if diff is not None:
            return diff
    return None


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(BLOCK), fb.read(BLOCK)
            if x != y:
                return False
            if not x:
                return True


def _compare_records(old: dict, new: dict) -> Difference | None:
    """Records are equal apart from where the inputs were found and the version that wrote them."""
    new = dict(new, mergelang=old["mergelang"], options=dict(new["options"], models=old["options"]["models"]))
    if len(new["inputs"]) == len(old["inputs"]):
        new["inputs"] = [dict(n, resolved=o["resolved"]) for n, o in zip(new["inputs"], old["inputs"])]
    path = _first_field_difference(old, new, "")
    return None if path is None else Difference(CARD_FILE, f"differs: its record's `{path}` is not what the merge records")


def _first_field_difference(a, b, where: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{where}.{k}".lstrip(".")
            found = _first_field_difference(a[k], b[k], f"{where}.{k}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for n, (x, y) in enumerate(zip(a, b)):
            found = _first_field_difference(x, y, f"{where}[{n}]")
            if found:
                return found
        return None if len(a) == len(b) else where.lstrip(".")
    return None if a == b else where.lstrip(".")


def _first_tensor_difference(a: Path, b: Path, name: str) -> Difference:
    try:
        ta, meta_a = read_header(a)
    except CheckpointError as e:
        return Difference(name, f"differs: {e.message}")
    tb, meta_b = read_header(b)
    for t in list(tb) + [t for t in ta if t not in tb]:
        if t not in ta:
            return Difference(name, "is missing from the folder", t)
        if t not in tb:
            return Difference(name, "is not written by the merge", t)
        x, y = ta[t], tb[t]
        if (x.dtype, x.shape) != (y.dtype, y.shape):
            return Difference(name, f"is {x.dtype} {list(x.shape)}, the merge writes {y.dtype} {list(y.shape)}", t)
        index = _first_differing_element(x, y)
        if index is not None:
            return Difference(name, f"differs, first at element {index} (flattened)", t)
    if meta_a != meta_b:
        return Difference(name, "differs in its header metadata")
    return Difference(name, "differs in its header layout (same tensors)")


def _first_differing_element(x, y) -> int | None:
    with open(x.path, "rb") as fa, open(y.path, "rb") as fb:
        done = 0
        while done < x.nbytes:
            n = min(BLOCK, x.nbytes - done)
            ba, bb = os.pread(fa.fileno(), n, x.start + done), os.pread(fb.fileno(), n, y.start + done)
            if ba != bb:
                ua = torch.frombuffer(bytearray(ba), dtype=torch.uint8)
                ub = torch.frombuffer(bytearray(bb), dtype=torch.uint8)
                at = int((ua != ub).nonzero()[0, 0]) if len(ba) == len(bb) else min(len(ba), len(bb))
                return (done + at) // x.torch_dtype.itemsize
            done += n
    return None
