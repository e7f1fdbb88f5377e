"""`python -m mergelang` runs the command line."""

from .launch import entry

entry()
