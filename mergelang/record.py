"""The record of a run (spec, inputs with their files' sha256, seed, options): built while the merge runs.

`start_record` lists each input's files and starts hashing them on a background thread; the merge
runs meanwhile; `PendingRecord.write_card` waits for the hashes and writes README.md. Only what
decides the output bytes goes in (no time, host or output path), so equal runs give equal cards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import __version__
from .check import Plan, parse_dtype
from .io.card import CARD_FILE, FORMAT, write_card
from .io.checkpoint import INDEX_FILE
from .io.hashing import BackgroundHasher
from .io.hub import looks_like_hub_id
from .io.hf_files import MODEL_FILES

# Besides weights: the index of .bin shards and a LoRA adapter's config (its rank and scale).
EXTRA_FILES = ("pytorch_model.bin.index.json", "adapter_config.json")


def input_files(folder: Path, weight_files: list[Path]) -> list[Path]:
    """The files of an input that can change the output: its weights, index, config and tokenizer."""
    extra = [folder / n for n in (INDEX_FILE, *EXTRA_FILES, *MODEL_FILES) if (folder / n).is_file()]
    return list(dict.fromkeys([*weight_files, *extra]))


def _name(path: Path, folder: Path) -> str:
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return str(path)


class PendingRecord:
    def __init__(self, record: dict, files: dict[str, tuple[Path, list[Path]]], hasher: BackgroundHasher):
        self.record, self.files, self.hasher = record, files, hasher  # files: key → (folder, paths)

    def finish(self) -> dict:
        """The complete record (waits for the hashes)."""
        hashes = self.hasher.result()
        for entry in self.record["inputs"]:
            folder, paths = self.files[entry["key"]]
            entry["files"] = [{"name": _name(p, folder), "size": hashes[p].size, "sha256": hashes[p].sha256}
                              for p in paths]
        return self.record

    def write_card(self, out_folder: Path) -> None:
        write_card(self.finish(), Path(out_folder) / CARD_FILE)

    def cancel(self) -> None:
        self.hasher.cancel()


def _rebinding(given) -> str:
    """A `--model NAME=PATH` as recorded: the absolute folder, or a hub id as written (not a path)."""
    path = Path(given).expanduser().resolve()
    return str(path) if path.exists() or not looks_like_hub_id(str(given)) else str(given)


def spec_source(plan: Plan):
    return plan.lowered.sources[plan.lowered.output_span.file]


def start_record(plan: Plan, seed: int, dtype: str | None, shard_size: int,
                 models: dict[str, Path]) -> PendingRecord:
    source = spec_source(plan)
    files: dict[str, tuple[Path, list[Path]]] = {}
    inputs = []
    for key, model in plan.lowered.inputs.items():
        ckpt = plan.checkpoints.get(key)
        folder = Path(getattr(ckpt, "path", model.folder))
        files[key] = (folder, input_files(folder, list(getattr(ckpt, "files", []))))
        inputs.append({"key": key, "path": model.path_text, "resolved": str(folder.resolve()), "files": []})
    spec = {"name": Path(source.name).name, "folder": str(source.folder), "text": source.text}
    template = plan.lowered.options.chat_template_file
    if template is not None:  # read at lowering: an input of the run, like the models' files
        data = Path(template).read_bytes()
        spec["files"] = [{"name": _name(Path(template), Path(source.folder)), "size": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()}]
    record = {
        "format": FORMAT,
        "mergelang": __version__,
        "spec": spec,
        "inputs": inputs,
        "seed": seed,
        "options": {
            "dtype": parse_dtype(dtype),
            "shard_size": shard_size,
            "models": {name: _rebinding(p) for name, p in sorted(models.items())},
        },
    }
    hasher = BackgroundHasher([p for _, paths in files.values() for p in paths]).start()
    return PendingRecord(record, files, hasher)
