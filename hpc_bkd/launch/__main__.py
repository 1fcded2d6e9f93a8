"""``python -m hpc_bkd.launch submit ...``: submit a distillation job through submitit.

    python -m hpc_bkd.launch submit -c vgg16-cifar10 --set data.root=/data/cifar10 \\
        --nodes 2 --tasks-per-node 4 --gpus-per-task 1 --partition gpu --time 240
    python -m hpc_bkd.launch submit -c tiny --nodes 1 --tasks-per-node 2 --partition debug \\
        --time 10 --folder runs/submitit/%j --wait

Prints the job id, log and run directory paths; with --wait, waits and prints the report summary
(exit 0 on success, 1 on failure).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpc_bkd.cli.args import add_job_arguments
from hpc_bkd.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from hpc_bkd.launch.submitit_backend import EXECUTORS, LaunchError, report, submit


def _kv(text: str) -> tuple[str, str]:
    """``--sbatch account=proj`` -> ("account", "proj"); dashes become underscores as submitit wants."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. account=myproj")
    key, value = text.split("=", 1)
    return key.strip().lstrip("-").replace("-", "_"), value


def build_parser() -> argparse.ArgumentParser:
    """The ``submit`` command: the job options every hpc_bkd CLI shares, then the scheduler's."""
    parser = argparse.ArgumentParser(prog="python -m hpc_bkd.launch",
                                     description="Submit hpc_bkd jobs through submitit (SLURM or local).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="submit one distillation job (`hpc_bkd run` on every rank)")
    add_job_arguments(p, run_dir_help="run directory (default: the config's run.dir); kept on requeue")
    p.add_argument("--executor", default="auto", choices=EXECUTORS,
                   help="slurm, local (one rank, this machine), debug (one rank, this process), "
                        "auto = slurm when sbatch is on PATH (default)")
    p.add_argument("--folder", default="submitit/%j", help="submitit folder for pickles and logs (%%j = job id)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=1, help="MPI ranks per node (default 1)")
    p.add_argument("--gpus-per-task", type=int, default=0, help="GPUs per rank (default 0: CPU only)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank (also its torch threads)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", type=float, default=60, dest="time_min", help="time limit in minutes (default 60)")
    p.add_argument("--job-name", default="hpc_bkd")
    p.add_argument("--mpi", default="pmi2",
                   help="srun --mpi plugin: pmi2 (bundled MPICH, default), pmix (Open MPI), "
                        "default = the site's MpiDefault")
    p.add_argument("--max-requeues", type=int, default=3, help="requeues after the time limit (default 3)")
    p.add_argument("--signal-delay", type=int, default=120, dest="signal_delay_s",
                   help="seconds before the time limit at which ranks checkpoint and requeue (default 120)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before srun, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--sbatch", action="append", default=[], type=_kv, metavar="KEY=VALUE",
                   help="extra #SBATCH option, e.g. --sbatch account=proj --sbatch qos=high (repeatable)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its report summary")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up waiting after this many s")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Submit, print where to look, and with --wait the outcome; exit codes as in hpc_bkd.cli.args."""
    args = build_parser().parse_args(argv)
    from hpc_bkd.config import ConfigError

    try:
        job = submit(args.config, args.overrides, run_dir=args.run_dir, executor=args.executor, folder=args.folder,
                     nodes=args.nodes, tasks_per_node=args.tasks_per_node, gpus_per_task=args.gpus_per_task,
                     cpus_per_task=args.cpus_per_task, partition=args.partition, time_min=args.time_min,
                     job_name=args.job_name, mpi=None if args.mpi in ("", "default") else args.mpi,
                     max_requeues=args.max_requeues, signal_delay_s=args.signal_delay_s, setup=args.setup,
                     sbatch=dict(args.sbatch))
    except (ConfigError, LaunchError, ValueError) as exc:
        print(f"hpc_bkd.launch: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_dir = job.submission().function.run_dir
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {args.tasks_per_node} rank(s)")
    print(f"  run dir  {run_dir}")
    task0 = job.task(0).paths
    print(f"  logs     {task0.stdout} and {task0.stderr.name} (rank 0; one pair per rank)")
    sys.stdout.flush()
    if not args.wait:
        return EXIT_OK
    try:
        rep = report(job, timeout_s=args.timeout)
    except TimeoutError as exc:
        print(f"hpc_bkd.launch: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # the job failed: say why, point at the logs
        print(f"hpc_bkd.launch: job {job.job_id} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    summary = Path(run_dir) / "summary.txt"
    if summary.is_file():
        print(summary.read_text(), end="")
    acc = rep.get("accuracy", {})
    print(json.dumps({"job_id": job.job_id, "status": rep.get("status"), "run_dir": rep.get("run_dir"),
                      "world_size": rep.get("world_size"), "accuracy": acc, "wall_s": rep.get("wall_s")}))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
