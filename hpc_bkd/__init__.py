"""hpc_bkd: parallel blockwise knowledge distillation (PBKD) of deep CNNs over MPI.

Data flows one way, one stage after the other in ``pipeline.run_job``: config -> teacher -> blocks
-> costs -> plan -> per-rank distill -> gather -> assemble/fine-tune -> measure and export -> report.

Modules, each with one job:

* config (the YAML config), data (datasets from local files, seeded batches), models (teachers);
* surgery (blocks of a teacher, taps, swapping and assembling, MACs), students (student blocks and
  their loss);
* schedule (step orders and their predicted makespan), plan (the torch-free planner), costs (the
  cost measurement and ``costs.json``);
* teacher (train or load the teacher), teacher_cache (its activations, cached), teams (data-parallel
  teams and their transports), distill (the per-rank distiller), finetune (acceptance, KD);
* deploy (folded BatchNorm, inference measurement), export (standalone files, ``load_student``);
* rundir (every file of a run directory), atomic_io (atomic writes, safe loads), records (the job
  record: the one report schema), report (summary and plots), pipeline (the stages);
* runtime (MPI, device, threads, logging, signals), peers (the heartbeat that names a lost rank),
  netaddr (addresses the nodes reach each other on), energy, cli_args and cli (the command line);
  launchers live in ``hpc_bkd.launch`` (submitit), the sbatch scripts in ``slurm/``.
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
