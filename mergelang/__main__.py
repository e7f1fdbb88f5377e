"""`python -m mergelang` runs the command line."""

from .cli import entry

entry()
