"""Errors every layer raises: a user mistake (one line, exit 2) and one-line texts of library exceptions."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake: printed as one line, exit code 2."""


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def os_error_text(e: OSError) -> str:
    """'No space left on device: /path' from an OSError (or its message when it has no errno)."""
    what = e.strerror or str(e) or type(e).__name__
    return f"{what}: {e.filename}" if e.filename else what
