"""What the output checkpoint carries beyond the formula's tensors: its vocabulary rows, tied
embeddings, the buffers transformers recomputes, and the config fields that must match the tensors.

- Vocabulary. Embedding matrices of models with different vocabularies keep the rows every model
  has (as mergekit does). With `tokenizer=X` the output has X's vocabulary size instead: the common
  rows are merged as usual and the rows beyond them are copied from X (`TensorPlan.tail`; the
  executor streams them from X chunk by chunk). This assumes the vocabularies agree on their common
  prefix, as when tokens were appended; where tokenizer.json files are present this is verified.
- Tied embeddings. A model with tied embeddings has no `lm_head.weight`. Where the reference model
  has one and another model has not, that model's input embedding stands in for it (its output
  embedding *is* its input embedding; mergekit's `tied_names` does the same). Where the reference is
  tied, the output is tied too (no `lm_head.weight`, config keeps `tie_word_embeddings`), and an
  untied model's `lm_head.weight` is left out with a warning naming it.
- Rotary caches (`rotary_emb.inv_freq` and the like) are non-persistent buffers that transformers
  recomputes from the config: they are skipped silently, whoever has them. Any other tensor that a
  model the formula uses lacks stays an error naming the model and the tensor.
- config.json: `vocab_size` equals the output's embedding rows, `num_hidden_layers` the output's
  layer count, `tie_word_embeddings` whether the output has no head of its own (matters with
  `config=` another model; the dtype is handled by the writer's caller).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .diagnostics import MISSING_TENSOR, SHAPE, Reporter
from .graph import walk
from .specialize import layer_index

# Buffers that transformers recomputes at load time; checkpoints saved by older versions hold them.
_RECOMPUTED = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
# An output head and the input embeddings it is tied to.
TIED = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight",
                           "model.decoder.embed_tokens.weight")}
# The input embedding, whose row count is the config's vocab_size.
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                    "tok_embeddings.weight")


def is_recomputed_buffer(name: str) -> bool:
    return _RECOMPUTED.search(name) is not None


def tie_heads(plan) -> dict[str, list[str]]:
    """Let each tied model's input embedding stand in for the output head the reference has.

    Returns {"aliased": models whose head is their input embedding, "untied": models with a head the
    tied output leaves out}.
    """
    ref = plan.checkpoints[plan.reference]
    found: dict[str, list[str]] = {"aliased": [], "untied": []}
    for head, embeddings in TIED.items():
        for key, ckpt in plan.checkpoints.items():
            if head in ref.tensors and head not in ckpt.tensors:
                embedding = next((e for e in embeddings if e in ckpt.tensors), None)
                if embedding is not None:
                    ckpt.tensors[head] = ckpt.tensors[embedding]
                    found["aliased"].append(key)
            elif head not in ref.tensors and head in ckpt.tensors and any(e in ref.tensors for e in embeddings):
                found["untied"].append(key)
    return found


def report_ties(plan, found: dict[str, list[str]], used: set[str], reporter: Reporter) -> None:
    aliased = [k for k in found["aliased"] if k in used]
    untied = [k for k in found["untied"] if k in used]
    if aliased:
        reporter.warn(MISSING_TENSOR, f"{_names(aliased)} {'ties' if len(aliased) == 1 else 'tie'} lm_head to the "
                                      f"input embeddings; `{plan.reference}` does not: the merge uses "
                                      f"{'its' if len(aliased) == 1 else 'their'} input embeddings as lm_head.weight",
                      plan.lowered.inputs[aliased[0]].span)
    if untied:
        reporter.warn(MISSING_TENSOR, f"`{plan.reference}` ties lm_head to the input embeddings, so the output does "
                                      f"too; the lm_head.weight of {_names(untied)} is left out",
                      plan.lowered.inputs[untied[0]].span,
                      help="to keep an untied head, put an untied model first in the formula")


def _names(keys: list[str]) -> str:
    return ", ".join(f"`{k}`" for k in keys)


def vocab_rows(tensor: str, shapes: dict[str, tuple[int, ...]], plan):
    """For an embedding matrix with tokenizer=X: (rows the graph computes, output rows), or None.

    `shapes` are the tensor's shapes in the formula's models; X counts too, used or not.
    """
    tokenizer = plan.lowered.options.tokenizer
    info = plan.checkpoints[tokenizer].tensors.get(tensor)
    if info is None or not info.shape:
        return None
    everyone = {**shapes, tokenizer: tuple(info.shape)}
    if len({s[1:] for s in everyone.values()}) != 1:
        return None
    common = min(s[0] for s in everyone.values())
    return common, info.shape[0]


def report_vocab(plan, widened: dict[tuple[int, int], list[str]], reporter: Reporter) -> None:
    """One warning per (common rows, output rows), and the check of the tokenizers' common prefix."""
    tokenizer = plan.lowered.options.tokenizer
    if tokenizer is None:
        return
    span = plan.lowered.options.span("tokenizer")
    for (common, rows), tensors in widened.items():
        shown = ", ".join(f"`{t}`" for t in tensors)
        if rows > common:
            what = f"rows 0..{common - 1} are merged, rows {common}..{rows - 1} are copied from `{tokenizer}`"
        else:
            what = f"the {common} rows are merged"
        reporter.warn(SHAPE, f"the models' vocabularies differ; with tokenizer={tokenizer} the output has "
                             f"`{tokenizer}`'s {rows} rows in {shown}: {what}", span)
        _check_prefix(plan, common, reporter)
    if not widened:  # one vocabulary size: the tokenizers must still agree on every id
        rows = next((t.shape[0] for t in plan.tensors if _is_input_embedding(t)), None)
        if rows is not None:
            _check_prefix(plan, rows, reporter)


def _vocab(folder: Path) -> dict[int, str] | None:
    """id → token from a tokenizer.json (its model vocabulary and added tokens), or None."""
    path = Path(folder) / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    vocab = (data.get("model") or {}).get("vocab")
    out: dict[int, str] = {}
    if isinstance(vocab, dict):
        out.update({i: t for t, i in vocab.items() if isinstance(i, int)})
    elif isinstance(vocab, list):  # unigram: [[token, score], ...]
        out.update({i: item[0] for i, item in enumerate(vocab) if item})
    for added in data.get("added_tokens") or ():
        if isinstance(added, dict) and isinstance(added.get("id"), int):
            out[added["id"]] = added.get("content")
    return out


def _check_prefix(plan, common: int, reporter: Reporter) -> None:
    """The first `common` ids must be the same tokens in every model whose tokenizer.json is there."""
    tokenizer = plan.lowered.options.tokenizer
    mine = _vocab(plan.checkpoints[tokenizer].path)
    if mine is None:
        return
    used = {n.attr("model") for n in walk(plan.lowered.output) if n.op == "load"}
    for key, ckpt in plan.checkpoints.items():
        theirs = _vocab(ckpt.path) if key != tokenizer and key in used else None
        if theirs is None:
            continue
        for i in range(common):
            if mine.get(i) != theirs.get(i):
                reporter.warn(SHAPE, f"the tokenizers of `{tokenizer}` and `{key}` disagree at id {i}: "
                                     f"{mine.get(i)!r} vs {theirs.get(i)!r}; their embedding rows are merged "
                                     "all the same, row by row", plan.lowered.options.span("tokenizer"),
                              help="merging embeddings assumes the vocabularies agree on their common ids")
                break


def _is_input_embedding(tp) -> bool:
    return len(tp.shape) == 2 and any(tp.name.endswith(e) for e in INPUT_EMBEDDINGS)


def config_updates(plan, config: dict | None) -> dict:
    """vocab_size and num_hidden_layers that match the planned tensors, where `config` says otherwise."""
    updates: dict = {}
    if not config:
        return updates
    rows = next((t.shape[0] for t in plan.tensors if _is_input_embedding(t)), None)
    if rows is not None and isinstance(config.get("vocab_size"), int) and config["vocab_size"] != rows:
        updates["vocab_size"] = rows
    names = {t.name for t in plan.tensors}
    for head, embeddings in TIED.items():
        if any(e in names for e in embeddings):
            tied = head not in names
            if config.get("tie_word_embeddings", False) != tied:
                updates["tie_word_embeddings"] = tied
    # Only where the reference's own config counts its layer tensors (not so with extra prediction layers).
    ref = plan.checkpoints[plan.reference]
    found = [i for i in (layer_index(t.name) for t in plan.tensors) if i is not None]
    counts = (ref.config or {}).get("num_hidden_layers") == _layers(ref.tensors)
    if found and counts and isinstance(config.get("num_hidden_layers"), int) \
            and config["num_hidden_layers"] != max(found) + 1:
        updates["num_hidden_layers"] = max(found) + 1
    return updates


def _layers(names) -> int:
    found = [i for i in map(layer_index, names) if i is not None]
    return max(found) + 1 if found else 0
