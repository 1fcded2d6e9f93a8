"""hpc_bkd: parallel blockwise knowledge distillation (PBKD) of deep CNNs over MPI.

Data flows one way: config -> plan -> per-rank distill -> gather -> assemble/fine-tune -> report.
Modules: config (YAML), data, models (teachers), surgery (blocks), students, plan (cost model and
assignment), runtime (MPI roles), distill (per-rank loop), finetune, report, energy, pipeline (the
job), cli; launchers live in hpc_bkd.launch.
"""
__version__ = "0.1.0"
