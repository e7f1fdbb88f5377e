"""Source text → AST (mergelang.ast), with a source span on every node."""

from __future__ import annotations

import ast as pyast
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import VisitError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast
from .diagnostics import SYNTAX, Diagnostic, MergelangError
from .resources import grammar_path

_OPEN = {"LPAR", "LSQB", "LBRACE"}
_CLOSE = {"RPAR", "RSQB", "RBRACE"}

# How the grammar's terminals read in an error message.
_TERMINAL_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "_NL": "end of line",
    "LPAR": "`(`", "RPAR": "`)`", "LSQB": "`[`", "RSQB": "`]`", "LBRACE": "`{`", "RBRACE": "`}`",
    "COMMA": "`,`", "EQUAL": "`=`", "PLUS": "`+`", "MINUS": "`-`", "STAR": "`*`", "SLASH": "`/`",
    "OUTPUT": "`output`", "DEF": "`def`", "MATCH": "`match`", "TENSOR": "`tensor`",
    "TRUE": "`true`", "FALSE": "`false`", "UNDERSCORE": "`_`", "$END": "end of file",
}


# A line ending in one of these continues on the next line.
_CONTINUES = {"EQUAL", "PLUS", "MINUS", "STAR", "SLASH", "COMMA"}


class _ContinueLines:
    """Post-lexer: a newline inside (), [] or {}, or after `=` or a binary operator, continues the statement."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        previous = None
        for token in stream:
            if token.type in _OPEN:
                depth += 1
            elif token.type in _CLOSE:
                depth = max(0, depth - 1)
            elif token.type == "_NL" and (depth or (previous is not None and previous.type in _CONTINUES)):
                continue
            previous = token
            yield token


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(
        grammar_path().read_text(),
        parser="lalr",
        lexer="contextual",
        postlex=_ContinueLines(),
        propagate_positions=True,
        maybe_placeholders=True,
    )


def parse(text: str, name: str = "<spec>", folder: Path | None = None) -> ast.Program:
    """Parse a spec. Raises MergelangError with one syntax diagnostic on malformed input."""
    source = ast.Source(name=name, text=text, folder=folder or Path.cwd())
    if not text.endswith("\n"):
        text += "\n"
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise MergelangError(_syntax_diagnostic(e, source)) from None
    try:
        statements = _ToAst(name).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, _PositionalAfterKeyword):
            raise MergelangError(
                Diagnostic(SYNTAX, "syntax error: positional argument after a keyword argument", e.orig_exc.span,
                           label="positional argument", help="put positional arguments before `name=value` ones")
            ) from None
        raise
    return ast.Program(statements=tuple(statements), source=source)


def parse_file(path: Path) -> ast.Program:
    return parse(path.read_text(encoding="utf-8"), name=str(path), folder=path.resolve().parent)


def _expected(e: UnexpectedInput) -> str:
    names = sorted({_TERMINAL_NAMES.get(t, f"`{t.lower()}`") for t in (getattr(e, "expected", None) or ())})
    if len(names) > 6:
        return ", ".join(names[:6]) + ", ..."
    return ", ".join(names)


def _syntax_diagnostic(e: UnexpectedInput, source: ast.Source) -> Diagnostic:
    line, col = max(1, e.line), max(1, e.column)
    if isinstance(e, UnexpectedCharacters):
        found = f"character `{source.line(line)[col - 1:col]}`"
        width = 1
    elif isinstance(e, UnexpectedToken) and e.token.type != "$END":
        tok = e.token
        found = "end of line" if tok.type == "_NL" else f"`{tok.value}`"
        width = 1 if tok.type == "_NL" else len(str(tok.value).splitlines()[0] or " ")
    else:
        found = "end of file"
        last = source.text.rstrip("\n").splitlines() or [""]
        line, col, width = len(last), len(last[-1]) + 1, 1
    expected = _expected(e)
    if isinstance(e, (UnexpectedToken, UnexpectedEOF)) and e.__class__ is UnexpectedToken and e.token.type == "_NL":
        # A newline where the expression was not finished: point just past its last character.
        text = source.line(line)
        col, width = len(text.rstrip()) + 1, 1
    span = ast.Span(source.name, line, col, line, col + width)
    message = f"syntax error: unexpected {found}"
    help_ = f"expected {expected}" if expected else None
    return Diagnostic(SYNTAX, message, span, label="unexpected here", help=help_)


class _PositionalAfterKeyword(Exception):
    def __init__(self, span: ast.Span):
        self.span = span


def _span(file: str, meta) -> ast.Span:
    return ast.Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _token_span(file: str, tok: Token) -> ast.Span:
    return ast.Span(file, tok.line, tok.column, tok.end_line, tok.end_column)


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _s(self, meta):
        return _span(self.file, meta)

    def start(self, meta, children):
        return [c for c in children if c is not None]

    def assign(self, meta, c):
        name, value = c
        return ast.Assign(ast.Name(str(name), _token_span(self.file, name)), value, self._s(meta))

    def output(self, meta, c):
        return ast.Output(c[0], self._s(meta))

    def def_(self, meta, c):
        name, *params, body = c
        params = tuple(p for p in params if p is not None)
        return ast.Def(ast.Name(str(name), _token_span(self.file, name)), params, body, self._s(meta))

    def param_required(self, meta, c):
        return ast.Param(str(c[0]), None, self._s(meta))

    def param_default(self, meta, c):
        return ast.Param(str(c[0]), c[1], self._s(meta))

    def _binop(op):  # noqa: N805 - helper used at class-definition time
        def rule(self, meta, c):
            return ast.BinOp(op, c[0], c[1], self._s(meta))

        return rule

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")

    def neg(self, meta, c):
        return ast.Neg(c[0], self._s(meta))

    def number(self, meta, c):
        text = str(c[0])
        value = int(text) if text.isdigit() else float(text)
        return ast.Number(value, self._s(meta))

    def string(self, meta, c):
        return ast.String(pyast.literal_eval(str(c[0])), self._s(meta))

    def true(self, meta, c):
        return ast.Bool(True, self._s(meta))

    def false(self, meta, c):
        return ast.Bool(False, self._s(meta))

    def name(self, meta, c):
        return ast.Name(str(c[0]), self._s(meta))

    def kwarg(self, meta, c):
        return ast.Keyword(str(c[0]), c[1], self._s(meta))

    def call(self, meta, c):
        func, *args = c
        args = [a for a in args if a is not None]
        seen_keyword = False
        for a in args:
            if isinstance(a, ast.Keyword):
                seen_keyword = True
            elif seen_keyword:
                raise _PositionalAfterKeyword(a.span)
        positional = tuple(a for a in args if not isinstance(a, ast.Keyword))
        keywords = tuple(a for a in args if isinstance(a, ast.Keyword))
        return ast.Call(ast.Name(str(func), _token_span(self.file, func)), positional, keywords, self._s(meta))

    def list(self, meta, c):
        return ast.List(tuple(x for x in c if x is not None), self._s(meta))

    def match(self, meta, c):
        return ast.Match(tuple(x for x in c if x is not None), self._s(meta))

    def pattern_arm(self, meta, c):
        tok, value = c
        pattern = ast.String(pyast.literal_eval(str(tok)), _token_span(self.file, tok))
        return ast.MatchArm(pattern, value, self._s(meta))

    def default_arm(self, meta, c):
        return ast.MatchArm(None, c[0], self._s(meta))
