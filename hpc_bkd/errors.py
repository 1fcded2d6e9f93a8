"""The exit codes of every hpc_bkd command and the one base of the errors a user acts on.

A scheduler or script that checks an exit code can rely on it meaning the same thing whichever
entry point ran (``hpc-bkd``, ``python -m hpc_bkd.launch``, a submitit job, the benchmarks). Each
expected ending is a subclass of :class:`UserError` that carries its own code, so the command line
reports any of them as one line (no traceback) without a hand-kept list of classes: a new error
class only has to pick its base.

Torch-free and import-free: every layer may raise these.
"""
from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
"""The command did what it was asked."""
EXIT_FAILED = 1
"""An unexpected error (a bug, a crashed rank, a failed job): the message has a traceback."""
EXIT_BAD_INPUT = 2
"""The input is wrong (config, data, run directory, arguments): fix it and run again."""
EXIT_INTERRUPTED = 3
"""Stopped (preemption, time limit, Ctrl-C) after saving: the same command again resumes."""
EXIT_PEER_LOST = 4
"""Another rank died or its node failed (no heartbeat within ``run.peer_timeout_s``): this rank
saved what it had and stopped; the same command again resumes."""


class UserError(Exception):
    """An ending the user acts on, not a bug: said in one line, with :attr:`exit_code`.

    Most subclasses are bad input (exit 2: fix it and run again); a stop (exit 3) and a lost peer
    (exit 4) are endings too, where running the same command again resumes.
    """

    exit_code: int = EXIT_BAD_INPUT
    advice: ClassVar[str] = ""
    """Appended to the one-line message: what to do about it, where that is always the same."""


class RootFailed(UserError):
    """Rank 0 failed in the stages it runs alone (choice, fine-tuning, report) while the other
    ranks waited for it: they end with its message and its exit code instead of waiting forever."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(f"rank 0 failed: {message}")
        self.exit_code = exit_code


def exit_code_of(exc: BaseException) -> int | None:
    """The exit code an exception ends a command with, or None for a bug (reported with its
    traceback, exit 1). ``FileNotFoundError`` and ``ValueError`` from anywhere count as bad input:
    they name a missing path or a wrong value the user gave."""
    if isinstance(exc, UserError):
        return exc.exit_code
    if isinstance(exc, (FileNotFoundError, ValueError)):
        return EXIT_BAD_INPUT
    return None
