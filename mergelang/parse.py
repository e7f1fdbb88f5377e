"""Source text → AST (mergelang.ast), with a source span on every node."""

from __future__ import annotations

import ast as pyast
import hashlib
import pickle
import sys
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, VisitError

from . import ast
from .diagnostics import SYNTAX, Diagnostic, MergelangError
from .paths import cache_dir, cache_folders, write_into
from .resources import grammar_path

_OPEN = {"LPAR", "LSQB", "LBRACE"}
_CLOSE = {"RPAR", "RSQB", "RBRACE"}

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
    """The LALR parser. Its tables are cached under the cache folder (lark checks the grammar's
    digest before using them): building them took 0.08 s of every run; loading them, 0.01 s."""
    cache = cache_dir() / "parser.lark"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # no cache folder: build the tables each time
        cache = None
    return Lark(
        grammar_path().read_text(),
        parser="lalr",
        lexer="contextual",
        postlex=_ContinueLines(),
        propagate_positions=True,
        maybe_placeholders=True,
        cache=str(cache) if cache else False,
    )


def parse(text: str, name: str = "<spec>", folder: Path | None = None) -> ast.Program:
    """Parse a spec. Raises MergelangError with one syntax diagnostic on malformed input."""
    source = ast.Source(name=name, text=text, folder=folder or Path.cwd())
    if not text.endswith("\n"):
        text += "\n"
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise MergelangError(_syntax_diagnostic(e, source, text)) from None
    try:
        statements = _ToAst(name).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, _Problem):
            raise MergelangError(e.orig_exc.diagnostic) from None
        raise
    return ast.Program(statements=tuple(statements), source=source)


def parse_file(path: Path) -> ast.Program:
    return parse(path.read_text(encoding="utf-8"), name=str(path), folder=path.resolve().parent)


def parse_files(paths: list[Path]) -> list[ast.Program]:
    """parse_file of each path, through a cache of the parsed programs: the stdlib's files, parsed
    by every run, took 19-31 ms; unpickling them takes 3 ms. The cache entry is named by a digest
    of the files' paths and bytes, the grammar, this module and the AST's definitions, and the
    Python version; an entry that cannot be read is parsed again and rewritten."""
    texts = [path.read_bytes() for path in paths]
    digest = hashlib.sha256(sys.version.encode())
    for part in (grammar_path(), Path(__file__), Path(ast.__file__)):
        digest.update(part.read_bytes())
    for path, text in zip(paths, texts):
        digest.update(f"\0{path}\0{len(text)}\0".encode() + text)
    name = f"programs-{digest.hexdigest()[:32]}.pickle"
    folders = cache_folders("parsed")
    for folder in folders:
        try:
            programs = pickle.loads((folder / name).read_bytes())
        except Exception:  # noqa: BLE001 - absent, unreadable or damaged: the next folder, else parse
            continue
        if isinstance(programs, list) and len(programs) == len(paths):
            return programs
    programs = [parse_file(path) for path in paths]
    try:
        write_into(folders, name, pickle.dumps(programs, protocol=pickle.HIGHEST_PROTOCOL))
    except (OSError, pickle.PicklingError):  # nowhere to keep it: parse again next time
        pass
    return programs


# What a syntax error message calls the terminals that are not fixed strings.
_TERMINAL_NAMES = {"NAME": "a name", "NUMBER": "a number", "STRING": "a string",
                   "_NL": "the end of the line", "$END": "the end of the file"}
# The order in which a message lists what was expected (anything else comes after, alphabetically).
_ORDER = ("`,`", "`)`", "`]`", "`}`", "`=`", "`=>`", "`(`", "`[`", "`{`", "`tensor`",
          "a name", "a number", "a string", "the end of the line", "the end of the file")
_EXPRESSION_START = {"NAME", "NUMBER", "STRING", "LPAR", "LSQB", "MINUS", "TRUE", "FALSE", "MATCH"}
_BINARY = {"PLUS", "MINUS", "STAR", "SLASH"}
_STATEMENT_START = {"NAME", "OUTPUT", "DEF"}
# Characters that word processors and keyboards put where the language has an ASCII one.
_LOOKALIKES = {"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "—": "-",
               "“": '"', "”": '"', "„": '"', "＝": "="}
_PAIRS = {"LPAR": ("(", ")"), "LSQB": ("[", "]"), "LBRACE": ("{", "}")}
_CLOSER = {"RPAR": "LPAR", "RSQB": "LSQB", "RBRACE": "LBRACE"}


def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[name]
    try:
        return f"`{_parser().get_terminal(name).pattern.value}`"
    except KeyError:
        return f"`{name.lower()}`"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _expected(accepts: set[str]) -> str:
    """What the parser would have accepted, in words: "an operator, `,` or `)`"."""
    rest = set(accepts)
    if _STATEMENT_START <= rest:
        return "a statement (`NAME = ...`, `output ...` or `def ...`)"
    words = []
    if {"NAME", "NUMBER", "STRING"} <= rest:
        words.append("an expression")
        rest -= _EXPRESSION_START
    if _BINARY <= rest:
        # After a complete operand; `(` and `=` would only make a name into a call or keyword.
        words.append("an operator")
        rest -= _BINARY | {"LPAR", "EQUAL"}
    if {"STRING", "UNDERSCORE"} <= rest:
        words.append('another arm (`"PATTERN" => ...` or `_ => ...`)')
        rest -= {"STRING", "UNDERSCORE"}
    rank = {word: i for i, word in enumerate(_ORDER)}
    words += sorted({_describe_terminal(t) for t in rest}, key=lambda w: (rank.get(w, len(rank)), w))
    return _join(words) if words else "something else"


def _accepts(e: UnexpectedInput) -> set[str]:
    parser = getattr(e, "interactive_parser", None)
    if parser is not None:
        try:
            return set(parser.accepts())
        except Exception:  # noqa: BLE001 - fall back to what the exception lists
            pass
    return set(getattr(e, "expected", None) or getattr(e, "allowed", None) or ())


def _statement_before(text: str, line: int, col: int) -> list[Token]:
    """The tokens of the statement that is being parsed at (line, col), up to that point."""
    found: list[Token] = []
    try:
        for tok in _parser().lex(text):
            if (tok.line, tok.column) >= (line, col):
                break
            if tok.type == "_NL":  # a newline that the post-lexer kept ends a statement
                found = []
            else:
                found.append(tok)
    except UnexpectedInput:
        pass
    return found


def _open_brackets(tokens: list[Token]) -> list[Token]:
    stack: list[Token] = []
    for tok in tokens:
        if tok.type in _PAIRS:
            stack.append(tok)
        elif tok.type in _CLOSER and stack and stack[-1].type == _CLOSER[tok.type]:
            stack.pop()
    return stack


def _syntax_diagnostic(e: UnexpectedInput, source: ast.Source, text: str) -> Diagnostic:
    file = source.name
    line, col = max(1, e.line), max(1, e.column)
    token = getattr(e, "token", None)
    at_end = isinstance(e, UnexpectedEOF) or (token is not None and token.type == "$END")
    if at_end:
        line, col = text.count("\n") + 1, 1
    before = _statement_before(text, line, col)
    still_open = _open_brackets(before)
    expected = _expected(_accepts(e))
    notes: tuple[str, ...] = ()
    help_ = None

    if at_end and still_open:
        opener = still_open[-1]
        close = _PAIRS[opener.type][1]
        return Diagnostic(SYNTAX, f"syntax error: unclosed `{opener.value}`: expected `{close}`, "
                                  "found the end of the file",
                          _token_span(file, opener), label="opened here", help=f"add the missing `{close}`")
    if at_end or (token is not None and token.type == "_NL"):
        # Nothing to point at: point just past the last token.
        found = "the end of the file" if at_end else "the end of the line"
        if before:
            last = before[-1]
            span = ast.Span(file, last.end_line, last.end_column, last.end_line, last.end_column + 1)
        else:
            span = ast.Span(file, 1, 1, 1, 2)
        return Diagnostic(SYNTAX, f"syntax error: expected {expected}, found {found}", span,
                          label=f"expected {expected}" if len(expected) < 40 else "")

    if isinstance(e, UnexpectedCharacters):
        char = source.line(line)[col - 1:col]
        if char == '"':
            end = len(source.line(line)) + 1
            return Diagnostic(SYNTAX, 'syntax error: unterminated string: expected a closing `"` on the same line',
                              ast.Span(file, line, col, line, end), label="this string is never closed",
                              help='a string ends on the line where it starts: add the closing `"`')
        found, span = f"`{char}`", ast.Span(file, line, col, line, col + 1)
        label = "unexpected character"
        if char in _LOOKALIKES:
            help_ = f"did you mean `{_LOOKALIKES[char]}`?"
        elif char == "'":
            help_ = 'strings are written in double quotes: "..."'
        elif char == "\\":
            help_ = "a `\\` continues a statement only as the last character of a line"
    else:
        found, span = f"`{token.value}`", _token_span(file, token)
        label = "unexpected here"
        if token.type in _CLOSER:
            if not still_open:
                help_ = f"this `{token.value}` has no matching `{_PAIRS[_CLOSER[token.type]][0]}`"
            elif still_open[-1].type != _CLOSER[token.type]:
                opener = still_open[-1]
                help_ = (f"the `{opener.value}` at {_token_span(file, opener)} is closed by "
                         f"`{_PAIRS[opener.type][1]}`, not `{token.value}`")
        elif not before and token.type in _BINARY:
            help_ = "to continue a statement on the next line, end the line with the operator"
    previous = before[-1] if before else None
    joins, depth = [], 0
    for a, b in zip(before, before[1:] + [None]):
        depth += (a.type in _OPEN) - (a.type in _CLOSE)
        if depth == 0 and a.type in _CONTINUES and (b.line if b is not None else line) > a.end_line:
            joins.append(a)
    if joins and not still_open:
        notes = (f"line {joins[-1].end_line} ends with `{joins[-1].value}`, so the statement goes on to the next line",)
    if help_ is None and still_open and still_open[-1].line < line:
        opener = still_open[-1]
        close = _PAIRS[opener.type][1]
        if previous is not None and previous.end_line < line:
            help_ = f"is a `{close}` missing at the end of line {previous.end_line}?"
        notes = (f"the `{opener.value}` at {_token_span(file, opener)} is still open",)
    return Diagnostic(SYNTAX, f"syntax error: expected {expected}, found {found}", span, label=label,
                      notes=notes, help=help_)


class _Problem(Exception):
    """A syntax error found while building the AST."""

    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic


# Words of the grammar that the contextual lexer would otherwise accept as names in some places.
_KEYWORDS = {"output", "def", "match", "true", "false"}


def _check_name(file: str, tok: Token) -> Token:
    if str(tok) in _KEYWORDS:
        raise _Problem(Diagnostic(SYNTAX, f"syntax error: expected a name, found the keyword `{tok}`",
                                  _token_span(file, tok), label="a keyword",
                                  help=f"`{tok}` is reserved; choose another name"))
    return tok


_SIMPLE_ESCAPES = set("\\\"'abfnrtv01234567\n")
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def _string_value(file: str, tok: Token) -> str:
    """The value of a STRING token, with Python's escapes; an unknown escape is an error, not a warning."""
    body = str(tok)
    i = body.find("\\")
    while i != -1:
        kind = body[i + 1]
        ok = kind in _SIMPLE_ESCAPES
        length = 2
        if kind in _HEX_ESCAPES:
            want = _HEX_ESCAPES[kind]
            digits = 0
            while digits < want and body[i + 2 + digits] in "0123456789abcdefABCDEF":
                digits += 1
            length += digits
            ok = digits == want
        elif kind == "N":
            close = body.find("}", i)
            ok = body[i + 2:i + 3] == "{" and close != -1
            length = (close + 1 - i) if ok else 2
        if ok:
            try:
                pyast.literal_eval('"' + body[i:i + length] + '"')
            except (SyntaxError, ValueError):
                ok = False
        if not ok:
            col = tok.column + i
            raise _Problem(Diagnostic(
                SYNTAX, f"syntax error: expected an escape such as `\\\\`, `\\\"` or `\\n` in a string, "
                        f"found `{body[i:i + length]}`", ast.Span(file, tok.line, col, tok.line, col + length),
                label="unknown escape", help="write `\\\\` for a backslash, or use `/` in paths"))
        i = body.find("\\", i + length)
    return pyast.literal_eval(body)


def _no_repeats(items, what: str) -> None:
    """Parameters of a `def`, or keyword arguments of a call, each name at most once."""
    first: dict[str, ast.Span] = {}
    for item in items:
        if item.name in first:
            raise _Problem(Diagnostic(
                SYNTAX, f"syntax error: expected each {what} once, found `{item.name}` twice", item.span,
                label=f"second `{item.name}`", notes=(f"the first is at {first[item.name]}",),
                help="remove one of them"))
        first[item.name] = item.span


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
        _check_name(self.file, name)
        return ast.Assign(ast.Name(str(name), _token_span(self.file, name)), value, self._s(meta))

    def output(self, meta, c):
        value, *options = c
        options = tuple(o for o in options if o is not None)
        _no_repeats(options, "output option")
        return ast.Output(value, self._s(meta), options)

    def output_option(self, meta, c):
        _check_name(self.file, c[0])
        return ast.Keyword(str(c[0]), c[1], self._s(meta))

    def def_(self, meta, c):
        name, *params, body = c
        _check_name(self.file, name)
        params = tuple(p for p in params if p is not None)
        _no_repeats(params, "parameter")
        return ast.Def(ast.Name(str(name), _token_span(self.file, name)), params, body, self._s(meta))

    def param_required(self, meta, c):
        _check_name(self.file, c[0])
        return ast.Param(str(c[0]), None, self._s(meta))

    def param_default(self, meta, c):
        _check_name(self.file, c[0])
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
        return ast.String(_string_value(self.file, c[0]), self._s(meta))

    def true(self, meta, c):
        return ast.Bool(True, self._s(meta))

    def false(self, meta, c):
        return ast.Bool(False, self._s(meta))

    def name(self, meta, c):
        _check_name(self.file, c[0])
        return ast.Name(str(c[0]), self._s(meta))

    def kwarg(self, meta, c):
        _check_name(self.file, c[0])
        return ast.Keyword(str(c[0]), c[1], self._s(meta))

    def call(self, meta, c):
        func, *args = c
        _check_name(self.file, func)
        args = [a for a in args if a is not None]
        seen_keyword = False
        for a in args:
            if isinstance(a, ast.Keyword):
                seen_keyword = True
            elif seen_keyword:
                raise _Problem(Diagnostic(
                    SYNTAX, "syntax error: expected `name=value` after a keyword argument, found a positional argument",
                    a.span, label="positional argument", help="put positional arguments before `name=value` ones"))
        positional = tuple(a for a in args if not isinstance(a, ast.Keyword))
        keywords = tuple(a for a in args if isinstance(a, ast.Keyword))
        _no_repeats(keywords, "keyword argument")
        return ast.Call(ast.Name(str(func), _token_span(self.file, func)), positional, keywords, self._s(meta))

    def list(self, meta, c):
        return ast.List(tuple(x for x in c if x is not None), self._s(meta))

    def match(self, meta, c):
        return ast.Match(tuple(x for x in c if x is not None), self._s(meta))

    def pattern_arm(self, meta, c):
        tok, value = c
        pattern = ast.String(_string_value(self.file, tok), _token_span(self.file, tok))
        return ast.MatchArm(pattern, value, self._s(meta))

    def default_arm(self, meta, c):
        return ast.MatchArm(None, c[0], self._s(meta))
