"""The output's model card (README.md): Hugging Face front matter, a description, and the run's record.

The record is a JSON object in a fenced block whose info string is `json mergelang-record`; it
holds what `mergelang verify` needs to re-check the inputs and re-run the merge. Everything in
the card comes from the record, so the same record always gives the same bytes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CARD_FILE = "README.md"
FORMAT = 1
RECORD_TAG = "mergelang-record"


class CardError(Exception):
    """A model card that is missing, or whose record is missing or malformed."""


# field → expected type, for the record and each of its inputs and files
_RECORD = {"format": int, "mergelang": str, "spec": dict, "inputs": list, "seed": int, "options": dict}
_SPEC = {"name": str, "folder": str, "text": str}
_INPUT = {"key": str, "path": str, "resolved": str, "files": list}
_FILE = {"name": str, "size": int, "sha256": str}
_OPTIONS = {"dtype": (str, type(None)), "shard_size": int, "models": dict}


def _fence(text: str) -> str:
    """A backtick fence longer than any run of backticks in text."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def _yaml_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def render_card(record: dict) -> str:
    """The card's text for a record (validated first)."""
    _validate(record)
    spec, inputs, options = record["spec"], record["inputs"], record["options"]
    lines = ["---", "base_model:"]
    lines += [f"- {_yaml_str(i['path'])}" for i in inputs]
    lines += ["library_name: transformers", "tags:", "- merge", "- mergelang", "---", ""]
    title = Path(spec["name"]).stem or "merge"
    lines += [f"# {title}", ""]
    names = ", ".join(_code(i["path"]) for i in inputs)
    how = f"seed {record['seed']}"
    if options["dtype"]:
        how += f", output dtype {options['dtype']}"
    lines += [f"A merge of {names}, made with mergelang {record['mergelang']} from the spec "
              f"{_code(spec['name'])} ({how}):", ""]
    fence = _fence(spec["text"])
    lines += [f"{fence}mergelang", spec["text"].rstrip("\n"), fence, ""]
    lines += ["To check that this folder is what the spec computes from these inputs, run "
              "`mergelang verify .` here: it re-checks the inputs' sha256, re-runs the merge and "
              "compares every file.", ""]
    lines += ["## Inputs", "", "| name | path | resolved path | file | size | sha256 |",
              "| --- | --- | --- | --- | ---: | --- |"]
    for i in inputs:
        first = True
        for f in i["files"] or [{"name": "", "size": 0, "sha256": ""}]:
            head = (_code(i["key"]), _code(i["path"]), _code(i["resolved"])) if first else ("", "", "")
            lines.append("| " + " | ".join(head + (_code(f["name"]), str(f["size"]), _code(f["sha256"]))) + " |")
            first = False
    body = json.dumps(record, indent=2, ensure_ascii=False)
    fence = _fence(body)
    lines += ["", "## Reproduce", "", "The record `mergelang verify` reads:", "",
              f"{fence}json {RECORD_TAG}", body, fence, ""]
    return "\n".join(lines)


def write_card(record: dict, path: Path) -> None:
    Path(path).write_text(render_card(record), encoding="utf-8", newline="\n")


def read_record(folder: Path) -> dict:
    """The record in folder/README.md; CardError says what is missing or wrong."""
    folder = Path(folder)
    card = folder / CARD_FILE
    if not folder.is_dir():
        raise CardError(f"{folder} is not a folder")
    try:
        text = card.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CardError(f"{folder} has no {CARD_FILE}, so no record of how it was made "
                        "(`mergelang run` writes one into every output folder)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CardError(f"cannot read {card}: {getattr(e, 'strerror', None) or e}") from None
    lines = text.split("\n")
    start = next((n for n, line in enumerate(lines)
                  if re.fullmatch(rf"(`{{3,}})json {RECORD_TAG}\s*", line)), None)
    if start is None:
        raise CardError(f"{card} holds no mergelang record (a ```json {RECORD_TAG} block); "
                        "it was not written by `mergelang run`, or the block was removed")
    fence = lines[start].split("json", 1)[0]
    end = next((n for n in range(start + 1, len(lines)) if lines[n].rstrip() == fence), None)
    if end is None:
        raise CardError(f"{card}: the mergelang record block opened on line {start + 1} is never closed")
    try:
        record = json.loads("\n".join(lines[start + 1:end]))
    except ValueError as e:
        raise CardError(f"{card}: the mergelang record (line {start + 2}) is not valid JSON: {e}") from None
    _validate(record, str(card))
    return record


def _check(obj, schema: dict, where: str, card: str) -> None:
    if not isinstance(obj, dict):
        raise CardError(f"{card}: {where} must be a JSON object, found {type(obj).__name__}")
    for name, kind in schema.items():
        if name not in obj:
            raise CardError(f"{card}: the mergelang record has no `{where}.{name}`".replace("`record.", "`"))
        value = obj[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise CardError(f"{card}: `{where}.{name}` in the mergelang record must be {expected}, "
                            f"found {type(value).__name__}".replace("`record.", "`"))


def _validate(record, card: str = "the card") -> None:
    _check(record, _RECORD, "record", card)
    if record["format"] > FORMAT:
        raise CardError(f"{card}: the mergelang record has format {record['format']}, this mergelang reads "
                        f"format {FORMAT} at most; use a newer mergelang")
    _check(record["spec"], _SPEC, "spec", card)
    _check(record["options"], _OPTIONS, "options", card)
    for n, i in enumerate(record["inputs"]):
        _check(i, _INPUT, f"inputs[{n}]", card)
        for m, f in enumerate(i["files"]):
            _check(f, _FILE, f"inputs[{n}].files[{m}]", card)
