"""A PEFT LoRA adapter folder read as a dense delta over its base model's tensors.

For a targeted weight W of the base (`model.layers.0.self_attn.q_proj.weight`), the adapter file
holds A = `base_model.model.<module>.lora_A.weight` (r × in) and B = `...lora_B.weight` (out × r);
the delta is (B @ A) · scale, with scale = alpha / r, or alpha / sqrt(r) for rsLoRA, where r and
alpha come from `rank_pattern` / `alpha_pattern` when a pattern matches the module (as PEFT does).
With `fan_in_fan_out` (GPT-2's Conv1D) the delta is transposed; embedding LoRA
(`lora_embedding_A` r × vocab, `lora_embedding_B` dim × r) is always transposed, as in PEFT.
Every other tensor of the base has a zero delta.

`LoraAdapter` has the interface of `Checkpoint` (`path`, `tensors`, `files`, `config`,
`read(name, start, stop)`, `close()`): its tensors are the base model's names, shapes and dtypes,
and `read` returns float32 elements of the delta. Opening checks everything from the headers;
`read` computes only the rows asked for (rounded out to whole row blocks), so a delta never needs
more than its chunk of memory beyond A and B.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergelang.io.checkpoint import Checkpoint, _load_json, element_range
from mergelang.io.safetensors_format import CheckpointError, TensorInfo, read_header
from mergelang.lazy import torch

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
FLOATS = {"F16", "BF16", "F32", "F64"}
# Config options whose adapters are not a plain B @ A delta; each must be unset (false, null or empty).
UNSUPPORTED = {
    "use_dora": "DoRA adapters rescale the merged weight by a learned magnitude",
    "lora_bias": "adapters with lora_bias also change the bias",
    "use_qalora": "QA-LoRA adapters pool their input",
    "use_bdlora": "block-diagonal LoRA adapters",
    "alora_invocation_tokens": "activated LoRA (aLoRA) adapters apply only after their invocation tokens",
    "velora_config": "VeLoRA adapters",
    "monteclora_config": "MonteCLoRA adapters",
    "arrow_config": "Arrow routing adapters",
    "kasa_config": "KaSA adapters",
    "layer_replication": "adapters with layer_replication change the layer stack",
    "target_parameters": "adapters on nn.Parameter targets (target_parameters)",
    "trainable_token_indices": "adapters with trainable tokens",
}
# The suffixes of the adapter file's tensors that mergelang reads: (kind, part).
_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
_CACHE_ENTRIES = 4
# The delta is computed in blocks of this many rows, aligned to multiples of it, whatever rows are
# asked for: a matrix product's rounding can depend on its shape, and this way every element comes
# from the same product whatever the chunk size, so the output bytes do not depend on it.
BLOCK_ROWS = 8


@dataclass(frozen=True)
class Target:
    """One adapted module: its A and B tensor names in the adapter file and its scale."""

    a: str
    b: str
    rank: int
    scale: float
    transpose: bool  # the delta is (B @ A)ᵀ: embeddings, and fan_in_fan_out (Conv1D) weights


def pattern_key(patterns, module: str) -> str | None:
    """The first pattern that matches the end of `module` at a dot boundary (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


class LoraAdapter:
    """The delta of a LoRA adapter over the base checkpoint `base`, with Checkpoint's interface."""

    def __init__(self, path: Path, base: Checkpoint, weights: Checkpoint, targets: dict[str, Target]):
        self.path = Path(path)
        self.base = base
        self.tensors: dict[str, TensorInfo] = base.tensors
        self.files = list(weights.files)
        self.config = base.config
        self.targets = targets  # base tensor name → Target
        self._weights = weights
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, folder: Path, base: Checkpoint) -> LoraAdapter:
        """Read adapter_config.json and the adapter's headers and check them against `base`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError("adapter folder not found" if not folder.exists()
                                  else "expected an adapter folder, found a file", path=folder)
        config_path = folder / CONFIG
        if not config_path.is_file():
            raise CheckpointError(f"no {CONFIG} in the adapter folder (expected a PEFT LoRA adapter)", path=folder)
        config = _load_json(config_path, CONFIG)
        if not isinstance(config, dict):
            raise CheckpointError(f"{CONFIG} must hold a JSON object, found {type(config).__name__}",
                                  path=config_path)
        _check_config(config, config_path)
        weights_path = folder / WEIGHTS
        if not weights_path.is_file():
            message = f"no {WEIGHTS} in the adapter folder"
            if (folder / "adapter_model.bin").is_file():
                message += "; found adapter_model.bin: convert it to safetensors"
            raise CheckpointError(message, path=folder)
        tensors = read_header(weights_path)[0]
        weights = Checkpoint(folder, tensors, [weights_path])
        targets = _targets(config, config_path, tensors, weights_path, base)
        return cls(folder, base, weights, targets)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened delta of tensor `name`, as a new 1-D float32 tensor."""
        info, stop = element_range(self.tensors, name, start, stop, f"the base of adapter {self.path}")
        # info.name, not name: a tied base's lm_head.weight is an alias of its input embeddings, whose
        # delta it shares (output_plan.tie_heads)
        target = self.targets.get(info.name)
        if target is None or start == stop:
            return torch.zeros(stop - start, dtype=torch.float32)
        a, b = self._factors(info.name, target)
        cols = info.shape[1]
        r0, r1 = start // cols, -(-stop // cols)
        first, end = r0 - r0 % BLOCK_ROWS, min(info.shape[0], -(-r1 // BLOCK_ROWS) * BLOCK_ROWS)
        rows = torch.empty((end - first, cols), dtype=torch.float32)
        for q in range(first, end, BLOCK_ROWS):
            _delta_rows(a, b, target, q, min(q + BLOCK_ROWS, end), rows[q - first:q - first + BLOCK_ROWS])
        rows.mul_(target.scale)
        offset = start - first * cols
        flat = rows.view(-1)
        return flat if offset == 0 and flat.numel() == stop - start else flat[offset:offset + stop - start].clone()

    def read_array(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The same elements as `read`, as a float32 numpy array."""
        return self.read(name, start, stop).numpy()

    def read_floats(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The same elements as `read`, as a numpy array."""
        return self.read_array(name, start, stop)

    def _factors(self, name: str, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None:
                self._cache.move_to_end(name)
                return hit
        pair = tuple(self._weights.read(t).to(torch.float32).view(self._weights.tensors[t].shape)
                     for t in (target.a, target.b))
        with self._lock:
            self._cache[name] = pair
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return pair

    def close(self) -> None:
        self._weights.close()
        with self._lock:
            self._cache.clear()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self.targets)} adapted tensors of {self.base.path})"


def _delta_rows(a: torch.Tensor, b: torch.Tensor, target: Target, r0: int, r1: int, out: torch.Tensor) -> None:
    """Rows [r0, r1) of B @ A, or of its transpose, into `out` (PEFT's product, before the scale)."""
    if target.transpose:  # rows of (B @ A)ᵀ are columns of B @ A
        out.copy_((b @ a[:, r0:r1]).T)
    else:
        torch.mm(b[r0:r1], a, out=out)


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(config: dict, path: Path) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise CheckpointError(f"expected a LoRA adapter (peft_type \"LORA\"), found peft_type {peft_type!r}",
                              path=path)
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{key} is set: {what}; these are not supported, only plain LoRA "
                                  "(and rsLoRA) adapters are", path=path)
    if not _is_rank(config.get("r")):
        raise CheckpointError(f"r must be a positive integer, got {config.get('r')!r}", path=path)
    if not _is_alpha(config.get("lora_alpha")):
        raise CheckpointError(f"lora_alpha must be a finite number, got {config.get('lora_alpha')!r}", path=path)
    for field, valid, what in (("rank_pattern", _is_rank, "a positive integer"),
                               ("alpha_pattern", _is_alpha, "a finite number")):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise CheckpointError(f"{field} must be an object mapping module patterns to values, "
                                  f"got {patterns!r}", path=path)
        for key, value in patterns.items():
            if not valid(value):
                raise CheckpointError(f"{field}[{key!r}] must be {what}, got {value!r}", path=path)
            try:
                re.compile(key)
            except re.error as exc:
                raise CheckpointError(f"{field} key {key!r} is not a valid regular expression: {exc}",
                                      path=path) from None


def _targets(config: dict, config_path: Path, tensors: dict[str, TensorInfo], weights: Path,
             base: Checkpoint) -> dict[str, Target]:
    """Pair every lora_A with its lora_B and check both against the base tensor they adapt."""
    parts: dict[tuple[str, str], dict[str, str]] = {}  # (module, kind) → {"A": name, "B": name}
    saved = set(config.get("modules_to_save") or ())
    for name, info in tensors.items():
        hit = next(((s, kp) for s, kp in _SUFFIXES.items() if name.endswith(s)), None)
        if hit is None:
            _check_other(name, info, saved, weights, base)
            continue
        suffix, (kind, part) = hit
        if not name.startswith(PREFIX):
            raise CheckpointError(f"expected a tensor name starting with {PREFIX!r} (as PEFT saves them)",
                                  path=weights, tensor=name)
        if info.dtype not in FLOATS or len(info.shape) != 2:
            raise CheckpointError(f"expected a 2-D floating-point matrix, found {info.dtype} {list(info.shape)}",
                                  path=weights, tensor=name)
        parts.setdefault((name[len(PREFIX):-len(suffix)], kind), {})[part] = name

    rank_patterns, alpha_patterns = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    targets: dict[str, Target] = {}
    for (module, kind), found in parts.items():
        for part, other in (("A", "B"), ("B", "A")):
            if other not in found:
                have = found[part]
                partner = have[:-len(".weight") - 1] + other + ".weight" if kind == "linear" else have[:-1] + other
                raise CheckpointError(f"lora_{part} without lora_{other}: the adapter file has no {partner!r}",
                                      path=weights, tensor=have)
        a, b = found["A"], found["B"]
        r_key, alpha_key = pattern_key(rank_patterns, module), pattern_key(alpha_patterns, module)
        rank = rank_patterns[r_key] if r_key is not None else config["r"]
        alpha = alpha_patterns[alpha_key] if alpha_key is not None else config["lora_alpha"]
        target_name = module + ".weight"
        info = base.tensors.get(target_name)
        if info is None:
            raise CheckpointError(f"adapts module {module!r}, but the base model {base.path} has no tensor "
                                  f"{target_name!r}", path=weights, tensor=a)
        shape_a, shape_b = tuple(tensors[a].shape), tuple(tensors[b].shape)
        source = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
        if shape_a[0] != rank or shape_b[1] != rank:
            raise CheckpointError(f"expected rank {rank} ({source} in {CONFIG}): lora_A {list(shape_a)} must have "
                                  f"{rank} rows and lora_B {list(shape_b)} {rank} columns", path=weights, tensor=a)
        transpose = kind == "embedding" or bool(config.get("fan_in_fan_out"))
        delta = (shape_a[1], shape_b[0]) if transpose else (shape_b[0], shape_a[1])
        if tuple(info.shape) != delta:
            raise CheckpointError(f"lora_B {list(shape_b)} and lora_A {list(shape_a)} make a delta of shape "
                                  f"{list(delta)}, but the base's {target_name!r} has shape {list(info.shape)} "
                                  "(an adapter for another model?)", path=weights, tensor=a)
        if info.dtype not in FLOATS:
            raise CheckpointError(f"the base stores {target_name!r} as {info.dtype}, not a float type",
                                  path=weights, tensor=a)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        targets[target_name] = Target(a, b, rank, scale, transpose)
    return targets


def _check_other(name: str, info: TensorInfo, saved: set[str], weights: Path, base: Checkpoint) -> None:
    """Tensors besides A and B: a frozen copy of the base's embedding is fine; anything else is an error."""
    module = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if module.endswith(".base_layer.weight"):
        original = module[: -len(".base_layer.weight")] + ".weight"
        have = base.tensors.get(original)
        if have is not None and tuple(have.shape) == tuple(info.shape):
            return  # PEFT saves the (frozen) base embedding beside embedding LoRA weights
        found = f"shape {list(have.shape)}" if have is not None else "no such tensor"
        raise CheckpointError(f"the adapter was trained on a base whose {original!r} has shape {list(info.shape)}; "
                              f"the base model {base.path} has {found} (an adapter for another model, or a resized vocabulary?)",
                              path=weights, tensor=name)
    if module.endswith(".bias"):
        raise CheckpointError("trained biases (bias=\"all\" or \"lora_only\" in adapter_config.json) are not "
                              "supported; only LoRA deltas of weights are", path=weights, tensor=name)
    if "lora_magnitude_vector" in name:
        raise CheckpointError("DoRA magnitude vectors are not supported (use_dora adapters)", path=weights,
                              tensor=name)
    if any(part in saved for part in module.split(".")) or ".modules_to_save." in module:
        raise CheckpointError("full replacement tensors (modules_to_save) are not supported; only LoRA "
                              "deltas are: retrain without modules_to_save, or merge this module separately",
                              path=weights, tensor=name)
    raise CheckpointError("unexpected tensor: a LoRA adapter holds only lora_A/lora_B (and "
                          "lora_embedding_A/lora_embedding_B) weights", path=weights, tensor=name)
