"""Run one command line in its own process, forked from a warm interpreter (see tests/test_bad_inputs.py).

``run_module`` is what ``python -m <module> <args>`` runs, in a fresh child process with its own working
directory, stdout and stderr file descriptors and exit code; only the imports were done once beforehand.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
from pathlib import Path

PRELOAD = [
    "tests.cli_process",
    "trainer.cli",
    "trainer.train.run",
    "trainer.serve.export",
    "trainer.serve.publish",
    "eval.cli",
    "eval.config",
    "eval.runner",
    "eval.tasks",
]


def run_module(module: str, argv: list[str], cwd: str, stdout: str, stderr: str) -> None:
    """``python -m module *argv`` in this process, in ``cwd``, writing its output to the files given."""
    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    os.chdir(cwd)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class ForkedCli:
    """Runs command lines in children of one forkserver that imported ``PRELOAD`` once."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)

    def run(self, module: str, argv: list[str], cwd: Path, logs: Path, timeout: float) -> tuple[int | None, str, str]:
        """(exit code, None if it ran past ``timeout`` and was killed; stdout; stderr)."""
        stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
        child = self.context.Process(target=run_module, args=(module, argv, str(cwd), str(stdout), str(stderr)))
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            return None, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
        return child.exitcode, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
