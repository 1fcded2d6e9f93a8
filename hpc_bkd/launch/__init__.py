"""Launchers: submit a distillation job to a scheduler from Python or the shell.

``hpc_bkd.launch.submit(...)`` sends one job to SLURM (or to submitit's local/debug executors) and
returns the submitit job; ``hpc_bkd.launch.report(job)`` waits for it and returns the report dict
that rank 0 wrote to ``<run dir>/report.json``::

    from hpc_bkd import launch
    job = launch.submit("vgg16-cifar10", ["data.root=/data/cifar10"], nodes=2, tasks_per_node=4,
                        gpus_per_task=1, partition="gpu", time_min=240, folder="submitit/%j")
    print(job.job_id)
    report = launch.report(job)  # = job.task(0).result() (rank 0); job.result() for one task

From the shell: ``python -m hpc_bkd.launch submit -c tiny --nodes 1 --tasks-per-node 2 --wait``.

One backend per module (submitit's style): ``submitit_backend`` is the only one so far, and
``submitit_compat`` holds every use of submitit's private API. ``mpich`` removes the shared memory a
killed MPICH step leaves in /dev/shm, for this backend and for the plain ``sbatch`` path
(``slurm/*.sbatch`` in the repository). See docs/cluster.md.
"""
from __future__ import annotations

from hpc_bkd.launch.submitit_backend import DistillJob, LaunchError, make_executor, report, submit

__all__ = ["submit", "report", "make_executor", "DistillJob", "LaunchError"]
