"""Command line: ``python -m hpc_bkd [run|train-teacher|plan|distill|evaluate|export|status|config-keys|configs] ...``.

The same command works alone (one rank) and under ``mpirun -np N``/``srun``/``sbatch``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from hpc_bkd.cli.args import add_job_arguments, job_config
from hpc_bkd.config import ConfigError, describe_keys, shipped_configs
from hpc_bkd.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PEER_LOST, exit_code_of

log = logging.getLogger("hpc_bkd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpc-bkd", description="Parallel blockwise knowledge distillation over MPI.")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("run", help="the whole job: teacher -> distill -> fine-tune -> report (default)")
    add_job_arguments(p)
    p = sub.add_parser("train-teacher", help="train (or load) the teacher and cache it in the run directory")
    add_job_arguments(p)
    p = sub.add_parser("plan", help="print blocks, assignment and predicted per-rank load; trains nothing")
    add_job_arguments(p)
    p.add_argument("--ranks", type=int, default=None, help="plan for this many ranks (default: MPI size)")
    p.add_argument("--costs", default=None, help="plan from a JSON list of per-block costs; needs no model or data")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--hybrid", action="store_true", help="with --costs: allow data-parallel teams")
    p.add_argument("--bn-groups", type=int, default=1,
                   help="with --costs: distill.bn_groups of the job (teams of up to this many ranks "
                        "need no BatchNorm communication)")
    p = sub.add_parser("distill", help="distill and assemble the student, without end-to-end fine-tuning")
    add_job_arguments(p)
    p = sub.add_parser("evaluate", help="test accuracy and deploy-form inference speed of a run's teacher and student (JSON)")
    add_job_arguments(p)
    p = sub.add_parser("export", help="write a finished run's student (and teacher) as torch.export / ONNX files "
                                      "under <run dir>/export, for use without hpc_bkd")
    add_job_arguments(p)
    p.add_argument("--formats", default="pt2,onnx",
                   help="comma-separated: pt2 (torch.export), onnx (needs the export extra); default: both")
    p.add_argument("--teacher", action="store_true", help="also export the teacher (the baseline to compare with)")
    p = sub.add_parser("data-bench", help="decoded images/s of the input pipeline by worker count, next to what "
                                          "a rank of the plan consumes")
    add_job_arguments(p)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to time (default: 1,2)")
    p.add_argument("--batches", type=int, default=20, help="batches timed per worker count (default: 20)")
    p.add_argument("--ranks", type=int, default=1, help="ranks of the plan whose consumption is shown")
    p.add_argument("--no-plan", action="store_true", help="time the input only, not the blocks")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p = sub.add_parser("status", help="where a job stands (running, stopped or finished), from its run directory "
                                      "alone: no MPI, safe while the job runs")
    add_job_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--watch", type=float, nargs="?", const=10.0, default=None, metavar="SECONDS",
                   help="print it again every SECONDS (default 10) until the job is no longer running")
    sub.add_parser("config-keys", help="every config key with its default and meaning")
    sub.add_parser("configs", help="list the shipped configs")
    return parser


def _cmd_plan(args: argparse.Namespace) -> int:
    from hpc_bkd.planning.planner import TeamModel, describe_plan, make_plan
    from hpc_bkd.planning.table import costs_from_json

    if args.costs:
        costs = costs_from_json(args.costs)
        plan = make_plan(costs, args.ranks or 1, hybrid=args.hybrid, tm=TeamModel.for_groups(args.bn_groups))
        print(json.dumps(plan.to_dict(), indent=2))
        return EXIT_OK
    from mpi4py import MPI

    from hpc_bkd.job.stages import plan_only

    # a plan is the same whichever way students are chosen later, so several candidates may be
    # planned without select.method budget (a run still asks for it)
    args.overrides = ["select.method=budget", *args.overrides]
    cfg = job_config(args)
    ranks = args.ranks or MPI.COMM_WORLD.size
    preview = plan_only(cfg, ranks)
    if args.json:
        print(json.dumps(preview.to_json(), indent=2))
        return EXIT_OK
    print(f"{preview.arch}: {len(preview.blocks)} blocks ({preview.granularity} granularity), "
          f"{len(preview.units)} units, costs from {preview.costs.cost_model}")
    print(f"{'block':>5} {'name':<28} {'in':>14} {'out':>14} {'params':>10} {'MMACs':>9} {'candidate':<14} "
          f"{'teacher s':>9} {'student s':>9}")
    for u, c in zip(preview.units, preview.plan.costs):
        b = preview.blocks[u.block]
        print(f"{b.index:>5} {b.name[:28]:<28} {'x'.join(map(str, b.in_shape)):>14} "
              f"{'x'.join(map(str, b.out_shape)):>14} {b.params:>10,} {b.macs / 1e6:>9.2f} {u.candidate[:14]:<14} "
              f"{c.teacher:>9.4f} {c.student:>9.4f}")
    print(f"\nassignment for {ranks} rank(s):")
    print("\n".join(describe_plan(preview.plan)))
    for members, share in sorted(preview.costs.member_share.items()):
        print(f"a member of a {members}-rank team measured at {share:.2f} of one rank's time (before communication)")
    return EXIT_OK


def _cmd_train_teacher(args: argparse.Namespace) -> int:
    from hpc_bkd.data.sources import check_batches, load_data
    from hpc_bkd.distill.teacher import accuracy, get_teacher
    from hpc_bkd.distributed.peers import watching_peers
    from hpc_bkd.distributed.runtime import Interrupted, init_runtime, install_stop_handlers, setup_logging
    from hpc_bkd.job.limits import check_fits
    from hpc_bkd.store.lock import run_dir_lock
    from hpc_bkd.store.rundir import RunDir

    cfg = job_config(args)
    rt = init_runtime(cfg.run.device, cfg.run.threads)
    setup_logging(rt.rank, rt.size)
    install_stop_handlers()
    status = 0
    with ExitStack() as stack, watching_peers(rt, cfg.run.peer_timeout_s):
        if rt.is_root:
            lock = stack.enter_context(run_dir_lock(cfg.run.dir))
            run_dir = RunDir(lock.parent)
            run_dir.check_same_job(cfg)
            check_fits(cfg, rt.device)
            data = load_data(cfg.data, cfg.run.seed)
            check_batches(cfg, data)
            try:
                teacher, info = get_teacher(cfg, data, run_dir, rt.device)
                print(f"teacher {cfg.model.arch} ({info['source']}): test acc "
                      f"{accuracy(teacher, data, 'test', cfg.data.eval_batch_size):.2f}%, cached at {run_dir.teacher}")
            except Interrupted:
                status = EXIT_INTERRUPTED
        return rt.bcast(status)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Test accuracy and deploy-form inference speed of a run's teacher and student (JSON)."""
    from hpc_bkd.data.sources import load_data
    from hpc_bkd.deploy.export import load_run
    from hpc_bkd.deploy.form import TimingPlan, measure_models
    from hpc_bkd.distill.teacher import accuracy
    from hpc_bkd.distributed.runtime import init_runtime

    cfg = job_config(args)
    try:
        run = load_run(cfg.run.dir)
    except FileNotFoundError as exc:
        raise missing_run(cfg.run.dir, args) or exc from None
    rt = init_runtime("cpu", cfg.run.threads)
    data = load_data(run.config.data, run.config.run.seed)
    speed = measure_models(run.teacher, run.student, run.input_shape,
                           TimingPlan(batch_size=run.config.data.eval_batch_size, threads=rt.threads))
    c = speed.models
    result = {"teacher_test_acc": accuracy(run.teacher, data, "test"),
              "student_test_acc": accuracy(run.student, data, "test"), "accepted_blocks": list(run.accepted),
              "teacher_latency_ms": c.teacher.latency_ms_median, "student_latency_ms": c.student.latency_ms_median,
              "teacher_images_per_s": c.teacher.throughput_ips, "student_images_per_s": c.student.throughput_ips,
              "speed": c.line}
    print(json.dumps(result, indent=2))
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    """Export a finished run for deployment.

    A missing run directory, student or optional package (the ``export`` extra) is for the user to
    fix, so it is one line and exit 2, not a traceback; an ImportError of hpc_bkd's own modules is a
    bug and keeps its traceback.
    """
    cfg = job_config(args)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        from hpc_bkd.deploy.export import export_main

        export_main(Path(cfg.run.dir), formats, args.teacher)
    except (FileNotFoundError, ImportError) as exc:
        if isinstance(exc, ImportError) and (exc.name or "").startswith("hpc_bkd"):
            raise
        if isinstance(exc, FileNotFoundError):
            exc = missing_run(cfg.run.dir, args) or exc
        print(f"hpc-bkd: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return EXIT_OK


class NoFinishedRun(FileNotFoundError):
    """``evaluate``/``export`` of a directory without a finished run: the message says what to run."""


def missing_run(run_dir: str, args: argparse.Namespace) -> NoFinishedRun | None:
    """When ``run_dir`` holds no finished run (no student.pt), the error to give instead of a
    missing file's: what is missing, and the command that makes the run, with the same config and
    overrides as the command given (so it is the same job). None when the student is there."""
    root = Path(run_dir)
    if (root / "student.pt").is_file():
        return None
    job = " ".join([*(["-c", args.config] if args.config else []), "--run-dir", str(root),
                    *(f"--set {o}" for o in args.overrides if not o.startswith("run.dir="))])
    what = (f"run directory {root} not found" if not root.exists() else f"{root} is not a directory"
            if not root.is_dir() else f"{root / 'student.pt'} not found: {root} holds no finished run")
    return NoFinishedRun(f"{what}; run `hpc-bkd run {job}` first (or give --run-dir of a finished run)")


def _cmd_run(args: argparse.Namespace, distill_only: bool = False) -> int:
    from hpc_bkd.job.stages import Interrupted, run_rank

    cfg = job_config(args)
    if distill_only:
        cfg.finetune.epochs = 0
    try:
        run_rank(cfg)
    except Interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK


COMMANDS = ("run", "train-teacher", "plan", "distill", "evaluate", "export", "data-bench", "status", "config-keys",
            "configs")


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``run`` put first when it names no command.

    ``python -m hpc_bkd`` and ``python -m hpc_bkd --set distill.epochs=2`` run the default job: the
    shortest command line is the common one, in a batch script as at a prompt. ``-h`` still shows
    the list of commands.
    """
    argv = list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        return ["run", *argv]
    return argv


def _cmd_data_bench(args: argparse.Namespace) -> int:
    """Input throughput by worker count against a rank's consumption (see ``databench``)."""
    from hpc_bkd.distributed.runtime import init_runtime, setup_logging
    from hpc_bkd.job.databench import describe, run_bench

    cfg = job_config(args)
    rt = init_runtime(cfg.run.device, cfg.run.threads)
    setup_logging(rt.rank, rt.size)
    bench = run_bench(cfg, [int(w) for w in args.workers.split(",")], args.batches, args.ranks, not args.no_plan,
                      rt.device)
    print("\n".join(describe(bench)))
    if args.json:
        Path(args.json).write_text(json.dumps(bench.to_json(), indent=2))
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    """Print the job's status (once, or every ``--watch`` seconds while it runs). Needs no MPI."""
    import time

    from hpc_bkd.job.status import NoJob, job_status, status_text

    try:
        run_dir = job_config(args).run.dir
        while True:
            st = job_status(run_dir)
            if args.watch is not None and not args.json and sys.stdout.isatty():
                print("\033[H\033[J", end="")  # a refreshing screen on a terminal; a log just grows
            print(json.dumps(st.to_json(), indent=2) if args.json else status_text(st), flush=True)
            if args.watch is None or st.state != "running":
                return EXIT_OK
            time.sleep(max(args.watch, 0.5))
    except (NoJob, ConfigError) as exc:
        print(f"hpc-bkd: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run one command on this rank and return its exit code (see :mod:`hpc_bkd.cli.args`).

    Errors are reported once, as one line when the input is at fault (exit 2) and with a traceback
    otherwise (exit 1); with several ranks, a failing one aborts them all.
    """
    args = build_parser().parse_args(normalize_argv(sys.argv[1:] if argv is None else argv))
    command = args.command
    if command == "config-keys":
        print(describe_keys())
        return EXIT_OK
    if command == "configs":
        for name, path in sorted(shipped_configs().items()):
            print(f"{name:<20} {path}")
        return EXIT_OK
    if command == "status":  # before MPI: a login node, or beside a running job, needs none
        return _cmd_status(args)
    from mpi4py import MPI

    from hpc_bkd.distributed.peers import PeerLost

    comm = MPI.COMM_WORLD
    try:
        if command == "plan":
            return _cmd_plan(args)
        if command == "train-teacher":
            return _cmd_train_teacher(args)
        if command == "evaluate":
            return _cmd_evaluate(args)
        if command == "export":
            return _cmd_export(args)
        if command == "data-bench":
            return _cmd_data_bench(args)
        return _cmd_run(args, distill_only=command == "distill")
    except PeerLost as exc:  # every rank left says it (which is lost may differ), then leaves alone
        return _leave_without_peers(exc, comm.rank, comm.size)
    except ConfigError as exc:  # same on every rank: rank 0 says it, all leave
        if comm.rank == 0:
            print(f"hpc-bkd: config error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Exception as exc:
        code = exit_code_of(exc)
        prefix = f"[rank {comm.rank}/{comm.size}] " if comm.size > 1 else ""
        if code is not None:
            print(f"hpc-bkd: {prefix}error: {exc}{getattr(exc, 'advice', '')}", file=sys.stderr, flush=True)
        else:
            print(f"hpc-bkd: {prefix}unexpected error:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            code = EXIT_FAILED
        if comm.size > 1:  # never leave the other ranks waiting in a collective
            from hpc_bkd.distributed.runtime import abort_all

            # the delay lets the launcher forward the message: MPI_Abort tears its stdio down
            abort_all(comm, code, f"hpc-bkd: {prefix}aborting all {comm.size} ranks", delay_s=1.0)
        return code


def _leave_without_peers(exc: Exception, rank: int, size: int) -> int:
    """Say which peers were lost, then end this process at once: MPI_Finalize (at a normal exit)
    may wait for the lost rank, and MPI_Abort could kill a peer that is still saving."""
    print(f"hpc-bkd: [rank {rank}/{size}] error: {exc}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)


if __name__ == "__main__":
    sys.exit(main())
