"""Errors of expected failures (bad input, missing data) shared by modules of every layer; the CLI turns
them into one line naming the file or key."""
from __future__ import annotations


class DataError(ValueError):
    """A text source that cannot be read or is too short; the message names it."""
