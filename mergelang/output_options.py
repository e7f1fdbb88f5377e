"""Options of the `output` statement: whose tokenizer and config the output carries, its chat
template and its dtype.

    output base + avg(ft0 - base, ft1 - base), tokenizer=ft0, config=base, dtype="bf16",
           chat_template="templates/chat.jinja"

`tokenizer=` and `config=` name a model of the spec (by default both are the reference model, the
first model the formula uses); `chat_template=` is a Jinja template, written inline or as the path of
a `.jinja` file relative to the spec; `dtype=` is the output dtype (the CLI's --dtype overrides it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import ast
from .diagnostics import INPUT, KEYWORD, TYPE, suggest
from .graph import Node

DTYPE_ALIASES = {
    "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "half": "F16",
    "fp32": "F32", "float32": "F32", "float": "F32", "fp64": "F64", "float64": "F64",
}
OPTION_NAMES = ("tokenizer", "config", "chat_template", "dtype")


@dataclass(frozen=True)
class OutputOptions:
    tokenizer: str | None = None  # model key whose tokenizer files (and vocabulary) the output carries
    config: str | None = None  # model key whose config.json / generation_config.json the output carries
    chat_template: str | None = None  # the template text
    chat_template_file: Path | None = None  # the .jinja file it was read from, if any (an input of the run)
    dtype: str | None = None  # safetensors dtype code, e.g. "BF16"
    spans: tuple[tuple[str, ast.Span], ...] = ()  # option name → where it was written

    def span(self, name: str) -> ast.Span | None:
        return dict(self.spans).get(name)


def lower_options(lowerer, options: tuple[ast.Keyword, ...], scope) -> OutputOptions:
    """Check and evaluate the options of the output statement (errors go to the lowerer's reporter)."""
    from .lower import POISON  # lower imports this module

    values: dict[str, object] = {}
    spans = []
    for k in options:
        if k.name not in OPTION_NAMES:
            lowerer.error(KEYWORD, f"`output` has no option `{k.name}`", k.span, label="unknown option",
                          help=suggest(k.name, OPTION_NAMES) or
                          "the options are " + ", ".join(f"`{n}=`" for n in OPTION_NAMES))
            continue
        value = lowerer.expr(k.value, scope)
        if value is POISON:
            continue
        spans.append((k.name, k.span))
        if k.name in ("tokenizer", "config"):
            if not (isinstance(value, Node) and value.op == "load"):
                lowerer.error(TYPE, f"`{k.name}=` must name a model, found {lowerer.describe(value)}",
                              k.value.span, label="not a model",
                              help=f'write `{k.name}=NAME` where `NAME = model("...")`')
                continue
            model = lowerer.inputs.get(value.attr("model"))
            if model is not None and model.kind == "lora":  # an adapter folder has no config or tokenizer
                lowerer.error(TYPE, f"`{k.name}=` must name a model, found the LoRA adapter `{model.key}`",
                              k.value.span, label="a LoRA adapter",
                              help=f"the adapter's config and tokenizer are its base's: write "
                                   f"`{k.name}={model.base_key}`")
                continue
            values[k.name] = value.attr("model")
        elif not isinstance(value, str):
            what = "a Jinja template or the path of a .jinja file" if k.name == "chat_template" else \
                'one of "bf16", "fp16", "fp32"'
            lowerer.error(TYPE, f"`{k.name}=` must be a string, {what}; found {lowerer.describe(value)}",
                          k.value.span, label="not a string")
        elif k.name == "dtype":
            code = DTYPE_ALIASES.get(value.lower())
            if code is None:
                lowerer.error(TYPE, f'`dtype=` must be one of "bf16", "fp16", "fp32", "fp64", found "{value}"',
                              k.value.span, label="unknown dtype",
                              help=suggest(value.lower(), DTYPE_ALIASES) or 'e.g. dtype="bf16"')
                continue
            values["dtype"] = code
        else:
            template = _template(lowerer, value, k.value.span)
            if template is not None:
                values["chat_template"] = template
                if _is_template_file(value):
                    values["chat_template_file"] = Path(lowerer.folder) / value
    return OutputOptions(spans=tuple(spans), **values)


def _is_template_file(value: str) -> bool:
    return not ("\n" in value or "{" in value or not value.endswith(".jinja"))


def _template(lowerer, value: str, span: ast.Span) -> str | None:
    """An inline template, or the text of a `.jinja` file relative to the spec's folder."""
    if not _is_template_file(value):
        return value
    path = (Path(lowerer.folder) / value)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        lowerer.error(INPUT, f"cannot read the chat template file {path}: {reason}", span,
                      label="this file", help="the path is relative to the spec's folder")
        return None
