"""hpc_bkd: parallel blockwise knowledge distillation (PBKD) of deep CNNs over MPI.

Data flows one way: config -> plan -> per-rank distill -> gather -> assemble/fine-tune -> report.
Modules: config (YAML), data, models (teachers), surgery (blocks), students, plan (cost model and
assignment), runtime (MPI roles), distill (per-rank loop), finetune, report, energy, pipeline (the
job), cli; launchers live in hpc_bkd.launch.
"""
__version__ = "0.1.0"

# The Python API, resolved on first use: `import hpc_bkd` stays light (no torch import) for the CLI,
# the MPI launchers and `python -m hpc_bkd config-keys`.
_LAZY = {"load_student": "export", "load_teacher": "export", "deploy_form": "deploy"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    """``hpc_bkd.load_student(run_dir)`` and friends, imported from their module when asked for."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
