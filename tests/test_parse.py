"""Golden tests for the parser and for diagnostics.

tests/golden/parse/NAME.ml   a valid spec; NAME.ast is `mergelang.ast.dump(parse(text, name="NAME.ml"))`
tests/golden/errors/NAME.ml  a spec with mistakes; NAME.txt is every diagnostic that parsing and lowering
                             it report, rendered and separated by blank lines

The golden files are reviewed by a person and committed; a normal run compares against them. After a
deliberate change, rewrite them with

    MERGELANG_UPDATE_GOLDEN=1 python -m pytest tests/test_parse.py tests/test_lower.py

and review the diff before committing.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelang.ast import Program, Source, dump
from mergelang.diagnostics import MergelangError, Reporter
from mergelang.lower import load_stdlib, lower
from mergelang.parse import parse, parse_file
from mergelang.resources import stdlib_files

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("MERGELANG_UPDATE_GOLDEN") == "1"



def check_golden(path: Path, actual: str) -> None:
    """Compare `actual` with the golden file, or rewrite the file when MERGELANG_UPDATE_GOLDEN=1."""
    actual = actual.rstrip("\n") + "\n"
    if UPDATE:
        path.write_text(actual, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"{path} is missing; run with MERGELANG_UPDATE_GOLDEN=1 to write it, then review it")
    expected = path.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            f"{path.name} (golden)", f"{path.name} (actual)"))
        pytest.fail(f"output differs from {path}:\n{diff}", pytrace=False)


def _cases(folder: str) -> list[Path]:
    return sorted((GOLDEN / folder).glob("*.ml"))


# ---- valid specs: the AST, with positions --------------------------------------------------------


@pytest.mark.parametrize("spec", _cases("parse"), ids=lambda p: p.stem)
def test_ast_golden(spec: Path):
    program = parse(spec.read_text(encoding="utf-8"), name=spec.name)
    check_golden(spec.with_suffix(".ast"), dump(program))


def _spans(node, parent=None):
    """(parent span, child span) for every node below `node`."""
    span = getattr(node, "span", None)
    if span is not None and parent is not None:
        yield parent, span
    children = node.statements if isinstance(node, Program) else [
        getattr(node, f.name) for f in fields(node) if f.name != "span"]
    for child in children:
        for item in child if isinstance(child, tuple) else (child,):
            if hasattr(item, "span") or isinstance(item, Program):
                yield from _spans(item, span)


@pytest.mark.parametrize("spec", _cases("parse"), ids=lambda p: p.stem)
def test_ast_spans_nest(spec: Path):
    """A node's span lies inside its parent's, and no span is empty."""
    program = parse(spec.read_text(encoding="utf-8"), name=spec.name)
    pairs = list(_spans(program))
    assert pairs
    for parent, child in pairs:
        assert (child.line, child.col) < (child.end_line, child.end_col)
        assert (parent.line, parent.col) <= (child.line, child.col)
        assert (child.end_line, child.end_col) <= (parent.end_line, parent.end_col)


def test_enough_ast_goldens():
    assert len(_cases("parse")) >= 8


# ---- specs with mistakes: the rendered diagnostics -----------------------------------------------


def diagnostics_of(text: str, name: str) -> list:
    try:
        lower(parse(text, name=name))
    except MergelangError as e:
        return e.diagnostics
    pytest.fail(f"{name} lowered without an error")


def render_errors(text: str, name: str) -> str:
    """Every diagnostic of parse + lower, as the CLI prints them; stdlib paths shown as <stdlib>/..."""
    _, sources = load_stdlib(Reporter())
    sources[name] = Source(name, text, Path("."))
    rendered = "\n\n".join(d.render(sources) for d in diagnostics_of(text, name))
    for path in stdlib_files():
        rendered = rendered.replace(str(path), f"<stdlib>/{path.name}")
    return rendered


@pytest.mark.parametrize("spec", _cases("errors"), ids=lambda p: p.stem)
def test_error_golden(spec: Path):
    check_golden(spec.with_suffix(".txt"), render_errors(spec.read_text(encoding="utf-8"), spec.name))


def test_enough_error_goldens():
    assert len(_cases("errors")) >= 14


def test_every_golden_has_its_spec():
    for folder, suffix in (("parse", ".ast"), ("errors", ".txt")):
        for golden in (GOLDEN / folder).glob(f"*{suffix}"):
            assert golden.with_suffix(".ml").exists(), f"{golden} has no spec"


# ---- properties of the parser that goldens do not show ----------------------------------------


def _ast(text: str) -> str:
    return dump(parse(text, name="t.ml"))


def test_missing_final_newline_is_fine():
    assert _ast('a = model("a")\noutput a') == _ast('a = model("a")\noutput a\n')


def test_crlf_line_ends_parse_like_lf():
    text = 'a = model("a")\n# comment\noutput a +\n  a * 2\n'
    assert _ast(text.replace("\n", "\r\n")) == _ast(text)


def test_tabs_count_as_one_column():
    program = parse('a\t=\tmodel("a")\noutput\ta\n', name="t.ml")
    assert program.statements[0].value.span.col == 5
    assert program.statements[1].value.span.col == 8


def test_integers_and_floats_keep_their_type():
    values = [s.value.value for s in parse("a = 3\nb = 3.0\nc = 1e3\nd = 007\noutput a\n").statements[:4]]
    assert values == [3, 3.0, 1000.0, 7]
    assert [type(v) for v in values] == [int, float, float, int]


def test_string_escapes():
    program = parse(r'a = "q\"\\\n\t\x41\u00e9\N{GREEK SMALL LETTER ALPHA}"' + "\noutput a\n")
    assert program.statements[0].value.value == 'q"\\\n\tAéα'


def test_parse_file_names_the_file_and_its_folder(tmp_path: Path):
    spec = tmp_path / "s.ml"
    spec.write_text('a = model("a")\noutput a\n', encoding="utf-8")
    program = parse_file(spec)
    assert program.source.name == str(spec)
    assert program.source.folder == tmp_path.resolve()
    assert program.statements[0].span.file == str(spec)


def test_stdlib_parses():
    for path in stdlib_files():
        parse_file(path)


@pytest.mark.parametrize("text", [
    "output",
    "output (",
    'output "',
    "output a +",
    "x = [1, 2",
    "def f(x) =",
    "output match tensor {",
    "output match tensor { _ =>",
    "x = 1 \\",
    ")",
    "output a\n)",
    "x = \"\\",
])
def test_syntax_errors_are_diagnostics_inside_the_text(text: str):
    """Every malformed input is one E001 diagnostic with a position inside the file (or just past its end)."""
    with pytest.raises(MergelangError) as info:
        parse(text, name="t.ml")
    [d] = info.value.diagnostics
    assert d.code == "E001"
    assert d.message.startswith("syntax error: ")
    lines = text.split("\n")
    assert 1 <= d.span.line <= len(lines)
    assert 1 <= d.span.col <= len(lines[d.span.line - 1]) + 1
    assert d.span.end_col > d.span.col


_PIECES = ["a", "model", "(", ")", "[", "]", "{", "}", ",", "=", "=>", "+", "-", "*", "/", "1", "0.5", "1e-3",
           '"x"', '"', "\\", "\n", " ", "#c\n", "output ", "def ", "match tensor", "_", "true", "$", "\\q"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=25))
def test_any_text_parses_or_gives_one_syntax_diagnostic(pieces):
    text = "".join(pieces)
    try:
        parse(text, name="t.ml")
    except MergelangError as e:
        [d] = e.diagnostics
        assert d.code == "E001" and d.message.startswith("syntax error: "), d.message
        lines = text.split("\n")
        assert 1 <= d.span.line <= len(lines) and 1 <= d.span.col <= len(lines[d.span.line - 1]) + 1, d.span
        assert d.render({"t.ml": Source("t.ml", text, Path("."))})
