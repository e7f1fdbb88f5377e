"""Where the grammar and the stdlib live: inside the installed wheel, or in a source checkout."""

from __future__ import annotations

from pathlib import Path

from .diagnostics import INPUT, Diagnostic, MergelangError

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The folder `grammar` or `stdlib`: `mergelang/_data/NAME` in a wheel, `NAME/` beside the package in a checkout."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    # A diagnostic, not a FileNotFoundError: a caller reading a user's file must not report it as theirs.
    raise MergelangError(Diagnostic(INPUT, f"mergelang's {name}/ folder is missing from the installation "
                                           f"({_PACKAGE})", help="reinstall mergelang"))


def grammar_path() -> Path:
    return data_dir("grammar") / "mergelang.lark"


def stdlib_files() -> list[Path]:
    return sorted(data_dir("stdlib").glob("*.ml"))
