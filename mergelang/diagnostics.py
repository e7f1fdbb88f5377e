"""User-facing errors: a code, a message, where it happened, and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ast import Source, Span

# Codes are stable: tests, docs and users refer to them.
SYNTAX = "E001"
UNKNOWN_NAME = "E002"
ARITY = "E003"
KEYWORD = "E004"
TYPE = "E005"
RANGE = "E006"
INPUT = "E007"
MISSING_TENSOR = "E008"
SHAPE = "E009"
CORRUPT = "E010"
DTYPE = "E011"
OUTPUT_PATH = "E012"
LIST_LENGTH = "E013"
REDEFINED = "E014"
OUTPUT_COUNT = "E015"
RECURSION = "E016"
NO_MATCH = "E017"
ARITHMETIC = "E018"
WRITE = "E019"
INTERRUPTED = "E020"
DARE_LARGE_DELTA = "E030"  # a warning: DARE with a high p on a large delta (stats.dare_warnings)
MISSING_DEPENDENCY = "E031"  # an optional extra is not installed (mergelang[plot])
UNSUPPORTED = "E032"  # a mergekit setting `mergelang import` cannot translate
RECORD = "E033"  # an output folder's model card or its record (`mergelang verify`)
INPUT_CHANGED = "E034"  # an input's file differs from the one the record names


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None = None
    label: str = ""  # printed after the carets
    notes: tuple[str, ...] = ()
    help: str | None = None
    severity: str = "error"

    def render(self, sources: dict[str, Source] | None = None) -> str:
        lines = [f"{self.severity}[{self.code}]: {self.message}"]
        if self.span is not None:
            lines.append(f"  --> {self.span}")
            try:
                source = sources[self.span.file] if sources is not None else None
            except KeyError:
                source = None
            text = source.line(self.span.line) if source else ""
            if text:
                number = str(self.span.line)
                gutter = " " * len(number)
                width = (self.span.end_col if self.span.end_line == self.span.line else len(text) + 1) - self.span.col
                carets = " " * (self.span.col - 1) + "^" * max(1, width)
                lines += [
                    f"{gutter} |",
                    f"{number} | {text}",
                    f"{gutter} | {carets}" + (f" {self.label}" if self.label else ""),
                ]
        lines += [f"  = note: {note}" for note in self.notes]
        if self.help:
            lines.append(f"  = help: {self.help}")
        return "\n".join(lines)


class MergelangError(Exception):
    """Raised with one or more diagnostics; the CLI prints them and exits non-zero."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic):
        self.diagnostics = [diagnostics] if isinstance(diagnostics, Diagnostic) else list(diagnostics)
        super().__init__("\n".join(d.message for d in self.diagnostics))


@dataclass
class Reporter:
    """Collects diagnostics so that one run of `check` reports every problem it can find."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def add(self, diagnostic: Diagnostic) -> None:
        if diagnostic not in self.diagnostics:
            self.diagnostics.append(diagnostic)

    def error(self, code: str, message: str, span: Span | None = None, **kw) -> None:
        self.add(Diagnostic(code, message, span, **kw))

    def warn(self, code: str, message: str, span: Span | None = None, **kw) -> None:
        self.add(Diagnostic(code, message, span, severity="warning", **kw))

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    def raise_if_errors(self) -> None:
        if self.errors:
            raise MergelangError(self.errors)


def suggest(name: str, candidates) -> str | None:
    """A 'did you mean' help line for a misspelled name, or None."""
    import difflib

    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None
