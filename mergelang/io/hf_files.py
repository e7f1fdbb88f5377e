"""The non-weight files of a Hugging Face model folder: config, generation config, tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mergelang.io.safetensors_format import CheckpointError

MODEL_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
CONFIG_FILES = ("config.json", "generation_config.json")




def copy_model_files(src: Path, dst: Path, *, dtype_name: str | None = None,
                     config_updates: dict | None = None, tokenizer_src: Path | None = None,
                     chat_template: str | None = None) -> list[str]:
    """Copy the files of MODEL_FILES that exist in `src` to `dst`; returns the names copied.

    With `dtype_name` (e.g. "bfloat16"), the copied config.json records it as `torch_dtype`
    (and as `dtype` where that key is present); `config_updates` are set in it too. The tokenizer
    files come from `tokenizer_src` when given. A `chat_template` is written as chat_template.jinja
    (which transformers prefers to any other) and replaces one in tokenizer_config.json.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in MODEL_FILES:
        if chat_template is not None and name in ("chat_template.jinja", "chat_template.json"):
            continue
        source = (src if name in CONFIG_FILES or tokenizer_src is None else Path(tokenizer_src)) / name
        if not source.is_file():
            continue
        if name == "config.json" and (dtype_name is not None or config_updates):
            _write_config(source, dst / name, dtype_name, config_updates or {})
        else:
            shutil.copyfile(source, dst / name)
        copied.append(name)
    if chat_template is not None:
        (dst / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        copied.append("chat_template.jinja")
        _replace_template(dst / "tokenizer_config.json", chat_template)
    return copied


def _replace_template(path: Path, template: str) -> None:
    """Where tokenizer_config.json carries a chat template, it becomes `template` too."""
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"tokenizer_config.json is not valid JSON: {exc}", path=path) from None
    if isinstance(config, dict) and "chat_template" in config:
        config["chat_template"] = template
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_config(source: Path, dest: Path, dtype_name: str | None, updates: dict) -> None:
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"config.json is not valid JSON: {exc}", path=source) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"config.json must hold a JSON object, found {type(config).__name__}", path=source)
    if dtype_name is not None:
        config["torch_dtype"] = dtype_name
        if "dtype" in config:
            config["dtype"] = dtype_name
    config.update(updates)
    dest.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
