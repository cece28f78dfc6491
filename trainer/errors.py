"""The one error path of every command line: a user mistake is one line on stderr and exit code 2.

Code anywhere in the project raises ``UserError`` for input a user can fix (a recipe key, a flag, a data
file, a checkpoint); the message names the file or key, the value and what would be valid. ``run_cli``
turns it into ``error: <message>`` and exit code 2; any other exception is a bug and keeps its traceback.
Ctrl-C prints one line saying what was kept and how to resume, and exits with 130 like a shell does.
The project's own info lines (``trainer.*``, ``eval.*`` loggers, e.g. "teacher cache: 4,700 texts reused from
...") go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

INTERRUPTED_EXIT = 130


class UserError(ValueError):
    """Input that cannot be used as given; the message says where it is, what it is and what is valid."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors (unknown flag, missing or ill-typed value) are the same one line; a
    flag must be spelt out (``--bit`` is not taken for ``--bits``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        print(f"error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def run_cli(command: Callable[[], None], on_interrupt: str = "interrupted; nothing was lost") -> None:
    """Run ``command``; a ``UserError`` becomes ``error: ...`` and exit 2, Ctrl-C ``on_interrupt`` and exit 130."""
    logging.basicConfig(format="%(message)s")
    for package in ("trainer", "eval"):
        logging.getLogger(package).setLevel(logging.INFO)
    try:
        command()
    except UserError as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"interrupted: {one_line(on_interrupt)}", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT) from None
