"""What every hpc_bkd command line shares: the job-selecting options (exit codes: :mod:`hpc_bkd.errors`).

``hpc-bkd`` (``python -m hpc_bkd``), ``python -m hpc_bkd.launch`` and the benchmark drivers all
pick a job the same way (a config, a run directory, ``--set`` overrides) and report the same
outcomes to the shell, so both live here once; a scheduler or script that checks an exit code
can then rely on it meaning the same thing whichever entry point ran.
"""
from __future__ import annotations

import argparse

from hpc_bkd.config import Config, load_config


def add_job_arguments(parser: argparse.ArgumentParser, *, run_dir_help: str | None = None) -> None:
    """Add ``-c/--config``, ``--run-dir`` and ``--set SECTION.KEY=VALUE`` to ``parser``.

    Every command that runs or inspects a job takes these three, spelled and defaulted the same,
    so that a command line copied from one entry point works in another. ``run_dir_help``
    replaces the ``--run-dir`` help where that option means a little more (e.g. kept on requeue).
    """
    parser.add_argument("-c", "--config", default=None,
                        help="YAML file or shipped config name (default: digits-vgg16; see `hpc-bkd configs`)")
    parser.add_argument("--run-dir", default=None, help=run_dir_help or "run directory (overrides run.dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set distill.epochs=2 (repeatable)")


def job_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides with ``--run-dir`` appended as ``run.dir=...``.

    ``--run-dir`` comes last so that it wins over a ``--set run.dir=...`` on the same line: the
    dedicated option is the more specific request.
    """
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run.dir={args.run_dir}")
    return overrides


def job_config(args: argparse.Namespace) -> Config:
    """The validated :class:`Config` that options added by :func:`add_job_arguments` select.

    Raises :class:`hpc_bkd.config.ConfigError` (a ``ValueError``) with a fix-it message when the
    file, a key or a value is wrong; callers turn that into :data:`EXIT_BAD_INPUT`.
    """
    return load_config(args.config, job_overrides(args))


__all__ = ["add_job_arguments", "job_config",
           "job_overrides"]
