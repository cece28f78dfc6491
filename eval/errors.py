"""The error type of user-facing evaluation mistakes (the CLI prints it and exits with code 2)."""

from __future__ import annotations


class EvalError(ValueError):
    """A request the evaluation cannot serve; the message names the input and what is valid."""
