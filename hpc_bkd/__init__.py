"""hpc_bkd: parallel blockwise knowledge distillation (PBKD) of deep CNNs over MPI.

Data flows one way, one stage after the other in ``job.stages.run_job``: config -> teacher -> blocks
-> costs -> plan -> per-rank distill -> gather -> select/assemble/fine-tune -> export -> report.

Subpackages by concern; each imports only from those listed after it (no import cycles):

* ``cli`` (the command line) and ``launch`` (submitit; the sbatch scripts are in ``slurm/``);
* ``job``: the stages in order, their records, the report, status and tracking;
* ``selection``: building each block's options and the exact choice among them;
* ``deploy``: deploy form, timing runtimes, standalone export;
* ``costs``: measuring unit and input costs (``costs.json``);
* ``distill``: the per-rank distiller, the teacher and its cache, teams, fine-tuning;
* ``data``: data sources, batches, streaming;
* ``store``: the run directory, atomic files, the report schema, progress files;
* ``config`` (the YAML config), ``distributed`` (MPI runtime, heartbeat), ``blocks`` (models, surgery,
  candidate kinds, students), ``planning`` (the torch-free cost model and planner), ``errors``.

Extension points: ``data.sources.register_source`` (a dataset), ``blocks.candidates.register_kind``
(a kind of student block), ``job.stages.run_rank`` (what a launcher runs on each rank).
"""
__version__ = "0.1.0"

# The Python API, resolved on first use: `import hpc_bkd` stays light (no torch import) for the CLI,
# the MPI launchers and `python -m hpc_bkd config-keys`.
_LAZY = {"load_student": "deploy.export", "load_teacher": "deploy.export", "deploy_form": "deploy.form"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    """``hpc_bkd.load_student(run_dir)`` and friends, imported from their module when asked for."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
