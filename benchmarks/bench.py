"""The benchmark: PBKD on 1 and N ranks, the paper's sequential schedule, and end-to-end KD, in one go.

    python -m benchmarks.bench [--config digits-vgg16] [--out bench/results] [--ranks 1,2] [--quick]

(from the repository root; the runs it starts find ``benchmarks`` through ``PYTHONPATH`` wherever they run)

1. trains the teacher once (``train-teacher``) and gives it to every run via ``teacher.checkpoint``;
2. runs, each through the real command line in its own process (``mpirun -np N`` for N > 1):
   ``pbkd-1`` (one rank), ``pbkd-N`` (N ranks, hybrid plan) and ``pbkd-N-blocks`` (N ranks, pure block
   split, ``plan.hybrid=false``) for every N, ``sequential-1`` (``distill.schedule=sequential``: the
   paper's one-block-at-a-time schedule) and ``kd-e2e`` (``python -m benchmarks.baseline``);
3. prints one table (runs as columns) and writes ``bench.json``, ``speedup.png`` (speedup and
   efficiency vs ranks), ``time_to_accuracy.png`` and each run's Gantt chart as ``gantt-<run>.png``.

Fairness: every run, the 1-rank ones included, gets ``run.threads = max(1, cores // max_ranks)`` CPU
threads per rank (and ``OMP_NUM_THREADS`` to match), so a 1-rank run uses one N-th of the machine and
the N-rank speedup measures the parallel method, not extra cores. The teacher is trained with all cores
(it is shared and not part of any comparison).

Definitions (all from each run's ``report.json``, read as an ``hpc_bkd.store.records.JobRecord``):
* speedup(N) = distill makespan(pbkd-1) / distill makespan(N ranks); efficiency = speedup / N;
* predicted makespan = the schedule's predicted s/batch of the slowest rank
  (``hpc_bkd.planning.schedule.Schedule.predicted_per_batch``: plan.makespan; for the sequential schedule, the sum
  over a rank's blocks of teacher prefix + student step) x steps/epoch x distill.epochs;
* block-img/s per rank = images put through a student block's train step on that rank per busy second
  (a block trained by a team of m ranks counts 1/m of each batch on each);
* time to teacher-1pt = the time from the end of data loading until the student's validation accuracy
  first comes within 1 point of the teacher's (PBKD: plan + broadcast + distill + assemble + fine-tune
  epochs up to that one; KD: training epochs up to that one); null when it never does;
* time to KD-best = the same clock, until the validation accuracy first reaches the best the
  end-to-end KD run reached in its whole budget.

The KD baseline trains the architecture PBKD-1 produced (its accepted blocks replaced, the rest teacher
layers), freshly initialised, at ``--kd-lr``, for ``--kd-epochs`` (default: teacher.epochs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpc_bkd.distributed.runtime import available_cores, cpu_model, keep_freed_memory, mem_total_bytes
from hpc_bkd.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from hpc_bkd.planning.schedule import schedule_for
from hpc_bkd.store import atomic_io
from hpc_bkd.store.records import Energy, JobRecord, to_plain

from .baseline import RESULT_FILE as KD_RESULT_FILE
from .baseline import KDRecord

REPO = Path(__file__).resolve().parents[1]
PAPER_STUDENT = ["blocks.candidates=", "select.method=tolerance"]  # [] = separable-d<student_depth>  # on every child's PYTHONPATH: `-m benchmarks.baseline` from anywhere

PHASES = ["data", "teacher", "plan", "broadcast", "distill+gather", "assemble", "finetune", "evaluate", "report"]
# efficiency: issue 20's 2-rank target on a 2-core CPU; of_ceiling: parallel efficiency over the real-work
# ceiling (the same job's 1-rank distillation, N copies at once); heartbeat: peer detection's share of a core
TARGETS = {"efficiency": 0.85, "of_ceiling": 0.95, "seq_speedup": 2.5, "seq_acc_points": 0.3,
           "prediction_error": 0.10, "within_points": 1.0, "heartbeat": 0.001}


# ------------------------------------------------------------------------------------------ hardware


def _mem_gb() -> float | None:
    total = mem_total_bytes()
    return None if total is None else round(total / 2**30, 1)


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _cpu_counters() -> tuple[float, float, float] | None:
    """(CPU seconds busy on the whole machine, seconds stolen by the hypervisor, CPU seconds of this
    process's finished children). The first minus the last, over a run, is what other processes used."""
    import resource

    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq (guest is inside user)
    steal = v[7] if len(v) > 7 else 0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes reaped grandchildren (mpirun's ranks)
    return busy / tick, steal / tick, ru.ru_utime + ru.ru_stime


def _contention(before, after, wall: float) -> dict[str, float] | None:
    if before is None or after is None or wall <= 0:
        return None
    busy, steal, ours = (a - b for a, b in zip(after, before))
    return {"other_processes_cores": max(0.0, (busy - ours) / wall), "steal_cores": steal / wall,
            "run_cores": ours / wall}


_PROBE = r"""
import json, torch
out = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "gpus": [], "mpi": None}
if torch.cuda.is_available():
    out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
try:
    from mpi4py import MPI
    out["mpi"] = MPI.Get_library_version().strip().splitlines()[0]
except Exception as exc:
    out["mpi"] = f"unavailable ({exc})"
print(json.dumps(out))
"""


def hardware(env: dict[str, str]) -> dict[str, Any]:
    """CPU model, cores, memory, torch, MPI library and GPUs (probed in a child: CUDA stays out of here)."""
    info: dict[str, Any] = {"host": platform.node(), "cpu_model": cpu_model(), "cores": available_cores(),
                            "logical_cpus": os.cpu_count(), "mem_gb": _mem_gb(), "python": platform.python_version(),
                            "os": f"{platform.system()} {platform.release()}"}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, env=env)
        info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    except Exception as exc:  # the bench itself will fail loudly later if torch is broken
        info["probe_error"] = str(exc)
    return info


def _env(threads: int) -> dict[str, str]:
    # a bench started inside an MPI/SLURM job must not hand its own PMI wiring to the children
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "SLURM_", "OMPI_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def _mpirun(explicit: str | None) -> str:
    if explicit:
        return explicit
    bundled = Path(sys.executable).parent / "mpirun"
    return str(bundled) if bundled.exists() else (shutil.which("mpirun") or shutil.which("mpiexec") or "mpirun")


# ------------------------------------------------------------------------------------------ runs


def calibration_work(iterations: int = 40) -> float:
    """A fixed slice of the default job's work (depthwise-separable student steps at two sizes,
    one thread); returns its seconds. Used to measure how far this machine itself scales."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    keep_freed_memory()  # as the ranks do
    torch.set_num_threads(1)
    torch.manual_seed(0)

    def student(c: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    work = [(student(c), torch.randn(64, c, hw, hw)) for c, hw in ((16, 32), (64, 8))]
    t0 = time.perf_counter()
    for _ in range(iterations):
        for model, x in work:
            F.mse_loss(model(x), x).backward()
    return time.perf_counter() - t0


def machine_ceiling(procs: int, env: dict[str, str]) -> dict[str, Any]:
    """Run the same fixed work in 1 process, then in ``procs`` at once: the parallel efficiency
    this machine allows independent single-thread processes (shared memory bandwidth, caches,
    vCPUs that are really hyperthreads), an upper bound for any method's efficiency here."""
    code = "from benchmarks.bench import calibration_work; print(calibration_work())"

    def run(n: int) -> list[float]:
        ps = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
              for _ in range(n)]
        return [float(p.communicate()[0].strip().splitlines()[-1]) for p in ps]

    alone = min(run(1) for _ in range(2))[0]
    together = run(procs)
    return {"procs": procs, "alone_s": alone, "together_s": together,
            "efficiency_ceiling": alone / max(together)}


def real_work_ceiling(setup: Setup, procs: int) -> dict[str, Any]:
    """The job's own 1-rank distillation (``hpc_bkd distill`` with pbkd-1's settings: its students,
    its teacher cache or prefix passes) alone, then ``procs`` independent copies at once: how far this
    machine lets that very work scale. Unlike ``machine_ceiling`` (a fixed student loop) it sees the
    job's memory traffic; being separate 1-rank jobs, it has no MPI, heartbeat or plan in it, so
    parallel efficiency over this ceiling is what the method itself loses."""
    def run(n: int, tag: str) -> list[float]:
        dirs = [setup.out / "ceiling" / f"{tag}-{i}" for i in range(n)]
        children = []
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            cmd = [sys.executable, "-m", "hpc_bkd", "distill", *setup.shared, "--run-dir", str(d)]
            with open(d / "log.txt", "w") as log:
                children.append(subprocess.Popen(cmd, env=setup.env, stdout=log, stderr=subprocess.STDOUT))
        for child, d in zip(children, dirs):
            if child.wait(timeout=setup.timeout) != 0:
                raise RuntimeError(f"ceiling run failed (rc {child.returncode}): {_tail(d / 'log.txt')}")
        return [JobRecord.load(d / "report.json").distill.makespan_s for d in dirs]

    alone = run(1, "alone")[0]
    together = run(procs, "together")
    return {"procs": procs, "alone_s": alone, "together_s": together,
            "efficiency_ceiling": alone / (sum(together) / len(together))}


@dataclass(frozen=True)
class RunSpec:
    """One configuration the bench runs: its name, ranks, kind and the overrides that make it differ."""

    name: str
    ranks: int
    kind: str          # pbkd | kd
    sets: list[str]    # --set overrides on top of the bench's own
    what: str          # for people


def plan_runs(ranks: list[int], kd: bool = True, sequential: bool = True) -> list[RunSpec]:
    """The runs, in order: pbkd-1, pbkd-N and pbkd-N-blocks for every N > 1, sequential-1, kd-e2e."""
    runs = [RunSpec("pbkd-1", 1, "pbkd", [], "PBKD, 1 rank")]
    for n in ranks:
        if n > 1:
            runs.append(RunSpec(f"pbkd-{n}", n, "pbkd", ["plan.hybrid=true"], f"PBKD, {n} ranks, hybrid plan"))
            runs.append(RunSpec(f"pbkd-{n}-blocks", n, "pbkd", ["plan.hybrid=false"],
                                f"PBKD, {n} ranks, pure block split"))
    if sequential:
        runs.append(RunSpec("sequential-1", 1, "pbkd", ["distill.schedule=sequential"],
                            "paper schedule (one block at a time), 1 rank"))
    if kd:
        runs.append(RunSpec("kd-e2e", 1, "kd", [], "end-to-end KD from scratch"))
    return runs


def _execute(cmd: list[str], log_path: Path, env: dict[str, str], timeout: float) -> tuple[int, float]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[bench] timed out after {timeout:.0f}s\n")
            rc = 124
    return rc, time.time() - t0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------ metrics


def _energy_text(energy: Energy | None) -> tuple[str, str | None]:
    """('123 J', None) or ('unavailable', reason)."""
    # TODO(issue 12): report.summary_text words the same counters; one helper could serve both
    if energy is None:
        return "unavailable", "no energy record"
    parts, reasons = [], []
    if energy.gpu_j is not None:
        parts.append(f"GPU {energy.gpu_j:.0f} J")
    elif energy.gpu_unavailable and "no GPU" not in energy.gpu_unavailable:
        reasons.append(f"GPU: {energy.gpu_unavailable}")
    if energy.cpu_package_j is not None:
        parts.append(f"CPU {energy.cpu_package_j:.0f} J")
    else:
        reasons.append(f"CPU: {energy.cpu_unavailable}")
    if parts:
        return " + ".join(parts), ("; ".join(reasons) or None)
    return "unavailable", "; ".join(reasons) or None


def predicted_per_batch(record: JobRecord) -> float:
    """The plan's predicted seconds per batch of the slowest rank under the schedule the job ran."""
    cached = bool(record.teacher_cache and record.teacher_cache.use)
    return schedule_for(record.config.distill.schedule, cached=cached).predicted_per_batch(record.plan)


def _block_images(record: JobRecord, steps: int) -> dict[int, float]:
    """Images each block's student put through its train step (its epochs x steps x batch)."""
    bs, epochs = record.config.data.batch_size, record.config.distill.epochs
    return {b.index: (b.epochs or epochs) * steps * bs for b in record.blocks}


def _rank_rows(record: JobRecord, steps: int) -> list[dict[str, Any]]:
    """Per rank: its blocks, busy and idle time, block-images per busy second, memory and energy (a
    block trained by a team of m ranks counts 1/m of each batch on each member)."""
    images = _block_images(record, steps)
    team: dict[int, int] = {}
    for row in record.ranks:
        for b in row.blocks:
            team[b] = team.get(b, 0) + 1
    rows = []
    for row in record.ranks:
        mine = sum(images[b] / team[b] for b in row.blocks)
        rows.append({"rank": row.rank, "blocks": row.blocks, "busy_s": row.busy_s, "idle_s": row.idle_s,
                     "threads": row.threads, "block_images_per_s": mine / row.busy_s if row.busy_s > 0 else None,
                     "peak_mem_mb": row.peak_mem_mb, "energy": to_plain(row.energy),
                     "heartbeat_cpu_s": row.heartbeat_cpu_s, "heartbeat_share": row.heartbeat_share})
    return rows


def _timeline(record: JobRecord) -> list[dict[str, Any]]:
    """The student's validation accuracy over time (after data loading), one point per fine-tune
    epoch: plan + broadcast + distill + assemble, then the fine-tune epochs up to that one."""
    clock = sum(record.phases_s.get(k, 0.0) for k in ("plan", "broadcast", "distill+gather", "assemble"))
    timeline = []
    for h in record.finetune:
        clock += h.time_s
        timeline.append({"epoch": h.epoch, "time_s": clock, "val_acc": h.val_acc})
    return timeline


def _plan_layout(record: JobRecord) -> dict[str, Any]:
    plan = record.plan
    return {"plan_method": plan.method, "plan_teams": plan.teams, "assignment": plan.assignment,
            "costs": to_plain(plan.costs)}


def _prediction(record: JobRecord, steps: int) -> dict[str, Any]:
    """The plan's prediction of the distillation makespan, against the measured one."""
    distill_s = record.distill.makespan_s
    per_batch = predicted_per_batch(record)
    predicted = per_batch * steps * record.config.distill.epochs
    return {"predicted_s_per_batch": per_batch, "predicted_distill_s": predicted,
            "prediction_error": (predicted - distill_s) / distill_s if distill_s > 0 else None,
            "plan_predicted_speedup": record.plan.predicted_speedup, "plan_makespan": record.plan.makespan}


def pbkd_metrics(record: JobRecord, n_train: int) -> dict[str, Any]:
    """What the bench tabulates of one PBKD run (its own output: plain JSON, keys as in bench.json)."""
    cfg = record.config
    steps = max(1, n_train // cfg.data.batch_size)
    distill_s = record.distill.makespan_s
    timeline = _timeline(record)
    energy_text, energy_reason = _energy_text(record.energy)
    return {
        "world_size": record.world_size, "schedule": cfg.distill.schedule, "hybrid": cfg.plan.hybrid,
        **_plan_layout(record), "teacher_cache": bool(record.teacher_cache and record.teacher_cache.use),
        "phases_s": record.phases_s, "wall_s": record.wall_s,
        "distill_s": distill_s, "broadcast_s": record.distill.broadcast_s, "gather_s": record.distill.gather_s,
        **_prediction(record, steps),
        "steps_per_epoch": steps, "distill_epochs": cfg.distill.epochs,
        "block_images_per_s": sum(_block_images(record, steps).values()) / distill_s if distill_s else None,
        "ranks": _rank_rows(record, steps),
        "accuracy": to_plain(record.accuracy), "accepted_blocks": len(record.accepted_blocks),
        "blocks": len({b.index for b in record.blocks}),  # a record per unit: several per block with candidates
        "accepted": [f"{b.index}:{b.candidate}" if b.candidate else str(b.index) for b in record.blocks if b.accepted],
        "student_test_acc": record.accuracy.student_after_finetune,
        "time_to_within": first_reaching(timeline, record.accuracy.teacher_val - TARGETS["within_points"]),
        "timeline": timeline, "energy": to_plain(record.energy), "energy_text": energy_text,
        "energy_reason": energy_reason, "finetune": to_plain(record.finetune),
    }


def first_reaching(timeline: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first point of ``timeline`` ({epoch, time_s, val_acc}) with val_acc >= target."""
    for p in timeline:
        if p["val_acc"] >= target:
            return {"epoch": p["epoch"], "time_s": p["time_s"], "acc": p["val_acc"]}
    return None


def kd_metrics(record: KDRecord) -> dict[str, Any]:
    """What the bench tabulates of the end-to-end KD run, in the keys ``pbkd_metrics`` shares."""
    energy_text, energy_reason = _energy_text(record.energy)
    return {
        "world_size": 1, "schedule": "end-to-end KD", "epochs": record.epochs, "lr": record.lr,
        "train_s": record.train_s, "wall_s": record.wall_s, "history": to_plain(record.history),
        "timeline": [{"epoch": h.epoch, "time_s": h.cumulative_s, "val_acc": h.val_acc} for h in record.history],
        "blocks_replaced": record.blocks_replaced, "blocks_total": record.blocks,
        "block_images_per_s": None, "images_per_s": record.images_per_s,
        "ranks": [{"rank": 0, "threads": record.threads, "peak_mem_mb": record.peak_mem_mb,
                   "images_per_s": record.images_per_s, "energy": to_plain(record.energy)}],
        "accuracy": {"teacher_test": record.teacher.test_acc, "teacher_val": record.teacher.val_acc,
                     "student_after_finetune": record.final_test_acc},
        "student_test_acc": record.final_test_acc,
        "time_to_within": to_plain(record.time_to_within.val),
        "time_to_within_test": to_plain(record.time_to_within.test),
        "energy": to_plain(record.energy), "energy_text": energy_text, "energy_reason": energy_reason,
    }


Metrics = dict[str, dict[str, Any]]  # run name -> pbkd_metrics / kd_metrics of the runs that succeeded


def derive(runs: dict[str, dict[str, Any]], ranks: list[int], ceiling: dict[str, Any] | None = None) -> dict[str, Any]:
    """Speedup, efficiency and the targets, from the runs that succeeded (``ceiling``: the
    real-work ceiling of the most ranks, ``real_work_ceiling``)."""
    ok = {k: v["metrics"] for k, v in runs.items() if v.get("metrics")}
    scaling = _scaling(ok, ranks)
    targets = (_efficiency_targets(ok, ranks, ceiling) + _heartbeat_targets(ok) + _sequential_targets(ok)
               + _prediction_targets(ok) + _kd_targets(ok, max(ranks)))
    return {"scaling": scaling, "targets": targets}


def _scaling(ok: Metrics, ranks: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Measured and planned speedup per rank count, for the hybrid plan and the pure block split;
    each multi-rank run's metrics gain its speedup and efficiency."""
    base = ok.get("pbkd-1")
    scaling: dict[str, list[dict[str, Any]]] = {"hybrid": [], "blocks": []}
    if not base:
        return scaling
    for variant, suffix in (("hybrid", ""), ("blocks", "-blocks")):
        scaling[variant].append({"ranks": 1, "speedup": 1.0, "efficiency": 1.0, "predicted_speedup": 1.0})
        for n in ranks:
            m = ok.get(f"pbkd-{n}{suffix}")
            if n > 1 and m:
                s = base["distill_s"] / m["distill_s"]
                pred = base["plan_makespan"] / m["plan_makespan"] if m.get("plan_makespan") else None
                scaling[variant].append({"ranks": n, "speedup": s, "efficiency": s / n, "predicted_speedup": pred})
                m["speedup"], m["efficiency"], m["predicted_speedup_vs_1"] = s, s / n, pred
    base["speedup"], base["efficiency"] = 1.0, 1.0
    return scaling


def _efficiency_targets(ok: Metrics, ranks: list[int], ceiling: dict[str, Any] | None) -> list[dict[str, Any]]:
    targets = []
    for n in [n for n in ranks if n > 1]:
        for suffix, label in (("", "hybrid"), ("-blocks", "pure block split")):
            m = ok.get(f"pbkd-{n}{suffix}")
            if m and "efficiency" in m:
                targets.append({"target": f"parallel efficiency, {n} ranks ({label}) >= {TARGETS['efficiency']:.2f}",
                                "value": round(m["efficiency"], 3), "met": m["efficiency"] >= TARGETS["efficiency"],
                                "primary": n == 2})
            if m and "efficiency" in m and ceiling and ceiling["procs"] == n:
                of = m["efficiency"] / ceiling["efficiency_ceiling"]
                m["efficiency_of_ceiling"] = of
                targets.append({"target": f"parallel efficiency over the real-work ceiling, {n} ranks ({label}) >= "
                                          f"{TARGETS['of_ceiling']:.2f}",
                                "value": round(of, 3), "met": of >= TARGETS["of_ceiling"], "primary": n == 2})
    return targets


def _heartbeat_targets(ok: Metrics) -> list[dict[str, Any]]:
    """Peer detection's cost: the heartbeat thread's largest share of a core over a run's ranks."""
    targets = []
    for name, m in ok.items():
        shares = [r["heartbeat_share"] for r in m.get("ranks", []) if r.get("heartbeat_share") is not None]
        if shares:
            targets.append({"target": f"{name}: heartbeat thread <= {TARGETS['heartbeat']:.1%} of a core per rank",
                            "value": max(shares), "met": max(shares) <= TARGETS["heartbeat"], "primary": True})
    return targets


def _sequential_targets(ok: Metrics) -> list[dict[str, Any]]:
    base, seq = ok.get("pbkd-1"), ok.get("sequential-1")
    if not (base and seq):
        return []
    ratio = seq["distill_s"] / base["distill_s"]
    targets = [{"target": f"1-rank PBKD vs sequential schedule (distill time) >= {TARGETS['seq_speedup']}x",
                "value": round(ratio, 3), "met": ratio >= TARGETS["seq_speedup"], "primary": True}]
    for key, label in (("student_after_finetune", "after fine-tuning"),
                       ("student_before_finetune", "before fine-tuning")):
        a, b = base["accuracy"].get(key), seq["accuracy"].get(key)
        if a is not None and b is not None:
            targets.append({"target": f"student test acc {label}, PBKD-1 vs sequential, within "
                                      f"{TARGETS['seq_acc_points']} points",
                            "value": round(a - b, 3), "met": abs(a - b) <= TARGETS["seq_acc_points"],
                            "primary": key == "student_after_finetune"})
    return targets


def _prediction_targets(ok: Metrics) -> list[dict[str, Any]]:
    return [{"target": f"{name}: predicted vs measured distill makespan within {TARGETS['prediction_error']:.0%}",
             "value": round(m["prediction_error"], 3), "met": abs(m["prediction_error"]) <= TARGETS["prediction_error"],
             "primary": m["schedule"] != "sequential"}
            for name, m in ok.items() if m.get("prediction_error") is not None]


def _kd_targets(ok: Metrics, n_top: int) -> list[dict[str, Any]]:
    """PBKD (1 rank and the most ranks) against end-to-end KD: time to a student within a point of
    the teacher, and (for information) time to the best accuracy KD reached in its whole budget."""
    kd = ok.get("kd-e2e")
    if not kd:
        return []
    names = ["pbkd-1"] + [f"pbkd-{n_top}"] * (n_top > 1)
    targets = []
    for name in names:
        m = ok.get(name)
        if m:
            a, b = m.get("time_to_within"), kd.get("time_to_within")
            met = a is not None and (b is None or a["time_s"] < b["time_s"])
            targets.append({"target": f"time to a student within {TARGETS['within_points']:g} point of the teacher "
                                      f"(val): {name} faster than end-to-end KD",
                            "value": {"pbkd_s": a and round(a["time_s"], 2), "kd_s": b and round(b["time_s"], 2)},
                            "met": met, "primary": name == "pbkd-1"})
    if not kd["timeline"]:
        return targets
    best = max(p["val_acc"] for p in kd["timeline"])
    kd_hit = first_reaching(kd["timeline"], best)
    assert kd_hit is not None  # its own best is reached, at the latest in the epoch that set it
    for name in names:
        m = ok.get(name)
        if m:
            a = first_reaching(m["timeline"], best)
            m["time_to_kd_best"] = a
            targets.append({"target": f"(info) time to end-to-end KD's best val acc ({best:.2f}%): {name} "
                                      f"faster than KD",
                            "value": {"pbkd_s": a and round(a["time_s"], 2), "kd_s": round(kd_hit["time_s"], 2)},
                            "met": a is not None and a["time_s"] < kd_hit["time_s"], "primary": False})
    kd["time_to_kd_best"] = kd_hit
    return targets


def cost_model_notes(runs: dict[str, dict[str, Any]], hw: dict[str, Any]) -> list[str]:
    notes = ["The cost model predicts, per batch, the teacher forward up to a rank's deepest block (with the "
             "teacher cache: one such forward per image for the whole run, i.e. 1/epochs of it per batch) plus one "
             "train step per owned student (plus the end-of-epoch validation of its blocks: one shared teacher "
             "prefix and each block's suffix, spread over the epoch's steps), timed over a few batches on every "
             "rank at once before distillation (so contention between ranks at that moment is in it; rank 0 "
             "plans with the median over ranks); a team is priced by its busiest member's measured share plus "
             "a fixed overhead. It leaves out: per-epoch checkpoint writes, batch assembly/normalisation, "
             "Python/hook overhead, and any change in the machine's speed after those first batches (this "
             "VM's drifts by tens of percent over minutes)."]
    for name, r in runs.items():
        m = r.get("metrics") or {}
        if m.get("predicted_distill_s") is not None:
            resid = m["distill_s"] - m["predicted_distill_s"]
            notes.append(f"{name}: measured {m['distill_s']:.1f}s vs predicted {m['predicted_distill_s']:.1f}s "
                         f"({m['prediction_error']:+.1%}); unmodelled time {resid:+.1f}s")
    one = (runs.get("pbkd-1") or {}).get("metrics") or {}
    seq = (runs.get("sequential-1") or {}).get("metrics") or {}
    if one.get("predicted_s_per_batch") and seq.get("costs"):
        t, s = [c["teacher"] for c in seq["costs"]], [c["student"] for c in seq["costs"]]
        bound = (sum(t) + sum(s)) / one["predicted_s_per_batch"]
        cached = one.get("teacher_cache")
        notes.append(f"Sequential schedule vs 1-rank PBKD at equal epochs, predicted from each run's measured block "
                     f"costs (validation folded in): (sum teacher prefixes + sum student steps) / (deepest prefix"
                     f"{' once per run (teacher cache)' if cached else ''} + sum student steps) = "
                     f"({sum(t):.3f} + {sum(s):.3f}) / {one['predicted_s_per_batch']:.3f} = {bound:.2f}x per batch: "
                     f"{'the 2.5x target is within reach' if bound >= TARGETS['seq_speedup'] else 'student steps dominate, so the 2.5x target is out of reach for this job'}.")
    busy = {name: v for name, r in runs.items()
            if (v := (r.get("contention") or {}).get("other_processes_cores")) is not None}
    if busy and max(busy.values()) > 0.1 * hw.get("cores", 1):
        notes.append("The machine was not idle: other processes used "
                     + ", ".join(f"{v:.2f}" for v in busy.values()) + f" of {hw.get('cores')} cores on average "
                     f"during {', '.join(busy)}. Those runs' timings are inflated, multi-rank ones most (their "
                     f"ranks compete for the cores); re-run on an idle machine for scaling numbers.")
    return notes


# ------------------------------------------------------------------------------------------ output


def _f(v: Any, fmt: str = "{:.1f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def median_round(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """Of one configuration's rounds, the one with the median distillation makespan (the lower
    middle for an even count), with every round's makespan in ``rounds_distill_s``; a failed round
    is returned as it is, so the bench fails."""
    failed = [t for t in tries if not t.get("metrics")]
    if failed:
        return failed[0]
    if len(tries) == 1 or "distill_s" not in tries[0]["metrics"]:
        return tries[-1]
    ordered = sorted(tries, key=lambda t: t["metrics"]["distill_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds_distill_s"] = [t["metrics"]["distill_s"] for t in tries]
    chosen["metrics"] = {**chosen["metrics"], "rounds_distill_s": chosen["rounds_distill_s"]}
    return chosen


def table(runs: dict[str, dict[str, Any]], hw: dict[str, Any], settings: dict[str, Any]) -> str:
    names = [n for n, r in runs.items() if r.get("metrics")]
    ms = {n: runs[n]["metrics"] for n in names}
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn) -> None:
        rows.append((label, [fn(ms[n]) if ms[n] else "-" for n in names]))

    row("ranks x threads", lambda m: f"{m['world_size']} x {m['ranks'][0].get('threads')}")
    def plan_cell(m: dict[str, Any]) -> str:
        if m["schedule"] != "parallel" or m["world_size"] == 1:
            return m["schedule"]
        teams = m.get("plan_teams")
        layout = "+".join(str(len(t)) for t in teams) if teams else m.get("plan_method")
        return f"{'hybrid' if m['hybrid'] else 'blocks'} {layout}"

    row("schedule / teams", plan_cell)
    row("teacher cache", lambda m: ("on" if m.get("teacher_cache") else "off") if "distill_s" in m else "-")
    for p in PHASES:
        row(f"phase {p} s", lambda m, p=p: _f(m.get("phases_s", {}).get(p)))
    row("KD training s", lambda m: _f(m.get("train_s")))
    row("total wall s", lambda m: _f(m.get("wall_s")))
    row("distill makespan s", lambda m: _f(m.get("distill_s")))
    if any(ms[n] and ms[n].get("rounds_distill_s") for n in names):
        row("  rounds (median kept)", lambda m: "/".join(f"{x:.0f}" for x in m.get("rounds_distill_s") or []) or "-")
    row("predicted makespan s", lambda m: _f(m.get("predicted_distill_s")))
    row("predicted error", lambda m: _f(m.get("prediction_error"), "{:+.1%}"))
    row("speedup vs pbkd-1", lambda m: _f(m.get("speedup"), "{:.2f}x"))
    row("parallel efficiency", lambda m: _f(m.get("efficiency"), "{:.2f}") if m["schedule"] == "parallel" else "-")
    row("block-img/s per rank", lambda m: "/".join(_f(r.get("block_images_per_s"), "{:.0f}") for r in m["ranks"])
        if m.get("block_images_per_s") is not None else "-")
    row("KD img/s", lambda m: _f(m.get("images_per_s"), "{:.0f}"))
    row("heartbeat % of a core", lambda m: "/".join(_f(r.get("heartbeat_share"), "{:.3%}") for r in m["ranks"])
        if any(r.get("heartbeat_share") is not None for r in m["ranks"]) else "-")
    row("efficiency / ceiling", lambda m: _f(m.get("efficiency_of_ceiling"), "{:.2f}"))
    row("idle s per rank", lambda m: "/".join(_f(r.get("idle_s")) for r in m["ranks"]) if "distill_s" in m else "-")
    row("peak MB per rank", lambda m: "/".join(_f(r.get("peak_mem_mb"), "{:.0f}") for r in m["ranks"]))
    row("student blocks", lambda m: f"{m['accepted_blocks']}/{m['blocks']}" if "blocks" in m else
        f"{len(m.get('blocks_replaced') or [])}/{m.get('blocks_total')} fresh")
    row("student test acc (BN-recal)", lambda m: _f(m["accuracy"].get("student_before_finetune"), "{:.2f}"))
    row("student test acc (final)", lambda m: _f(m.get("student_test_acc"), "{:.2f}"))
    row("time to teacher-1pt s", lambda m: _f((m.get("time_to_within") or {}).get("time_s"), none="never"))
    row("time to KD-best s", lambda m: _f((m.get("time_to_kd_best") or {}).get("time_s"),
                                          none="never" if "time_to_kd_best" in m else "-"))
    row("energy", lambda m: m["energy_text"])
    row("other procs' CPU (cores)", lambda m: _f((m.get("contention") or {}).get("other_processes_cores"), "{:.2f}"))

    width = max(11, *(len(n) for n in names), *(len(c) for _, cells in rows for c in cells)) + 1
    label_w = max(len(r[0]) for r in rows) + 1
    teacher = next((m["accuracy"].get("teacher_test") for m in ms.values() if m), None)
    head = [f"hpc_bkd bench: {settings['config']} on {hw.get('cpu_model')} ({hw.get('cores')} cores"
            f"{', GPU ' + ', '.join(hw['gpus']) if hw.get('gpus') else ''}), torch {hw.get('torch')}; "
            f"{settings['threads']} thread(s) per rank for every run; teacher test acc {_f(teacher, '{:.2f}')}%",
            "", f"{'':<{label_w}}" + "".join(f"{n:>{width}}" for n in names)]
    body = [f"{label:<{label_w}}" + "".join(f"{c:>{width}}" for c in cells) for label, cells in rows]
    reasons = sorted({m["energy_reason"] for m in ms.values() if m and m.get("energy_reason")})
    foot = [f"energy: {r}" for r in reasons]
    return "\n".join(head + body + ([""] + foot if foot else []))


def targets_text(targets: list[dict[str, Any]]) -> str:
    lines = ["targets:"]
    for t in targets:
        mark = "MET " if t["met"] else "MISS"
        v = t["value"]
        if isinstance(v, dict):
            value = ", ".join(f"{k} {'never' if val is None else f'{val:.1f}s'}" for k, val in v.items())
        elif "makespan" in t["target"]:
            value = f"{v:+.1%}"
        elif "points" in t["target"]:
            value = f"{v:+.2f} points"
        elif t["target"].startswith("1-rank"):
            value = f"{v:.2f}x"
        elif "heartbeat" in t["target"]:
            value = f"{v:.3%}"
        else:
            value = f"{v:.2f}"
        lines.append(f"  [{mark}] {t['target']}: {value}{'' if t.get('primary') else '  (secondary)'}")
    return "\n".join(lines)


def plots(out: Path, derived: dict[str, Any], runs: dict[str, dict[str, Any]]) -> list[str]:
    """Draw ``speedup.png`` and ``time_to_accuracy.png`` into ``out``; returns their names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _plot_scaling(plt, out / "speedup.png", derived["scaling"])
    _plot_time_to_accuracy(plt, out / "time_to_accuracy.png", runs)
    return ["speedup.png", "time_to_accuracy.png"]


def _plot_scaling(plt: Any, path: Path, sc: dict[str, list[dict[str, Any]]]) -> None:
    """Speedup and parallel efficiency vs ranks, measured and planned, for both plan variants."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    top = max([p["ranks"] for v in sc.values() for p in v] + [2])
    xs = list(range(1, top + 1))
    ax1.plot(xs, xs, "k:", label="ideal")
    ax2.axhline(1.0, color="k", ls=":", label="ideal")
    ax2.axhline(TARGETS["efficiency"], color="tab:red", ls="--", lw=0.8, label=f"target {TARGETS['efficiency']}")
    for variant, color in (("hybrid", "tab:blue"), ("blocks", "tab:orange")):
        pts = sc.get(variant) or []
        if len(pts) < 2:
            continue
        label = "hybrid plan" if variant == "hybrid" else "pure block split"
        ax1.plot([p["ranks"] for p in pts], [p["speedup"] for p in pts], "o-", color=color, label=f"{label} (measured)")
        pred = [p for p in pts if p.get("predicted_speedup") is not None]
        ax1.plot([p["ranks"] for p in pred], [p["predicted_speedup"] for p in pred], "x--", color=color, alpha=0.6,
                 label=f"{label} (plan)")
        ax2.plot([p["ranks"] for p in pts], [p["efficiency"] for p in pts], "o-", color=color, label=label)
    ax1.set_xlabel("ranks")
    ax1.set_ylabel("distillation speedup vs 1 rank")
    ax1.set_xticks(xs)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("ranks")
    ax2.set_ylabel("parallel efficiency")
    ax2.set_xticks(xs)
    ax2.set_ylim(0, 1.15)
    ax2.legend(fontsize=8)
    fig.suptitle("PBKD strong scaling (equal threads per rank)")
    atomic_io.savefig(fig, path)
    plt.close(fig)


def _plot_time_to_accuracy(plt: Any, path: Path, runs: dict[str, dict[str, Any]]) -> None:
    """Validation accuracy vs time: PBKD (after distillation, per fine-tune epoch) vs end-to-end KD."""
    fig, ax = plt.subplots(figsize=(7, 4))
    teacher_val = None
    for name, r in runs.items():
        m = r.get("metrics")
        if not m:
            continue
        teacher_val = m["accuracy"].get("teacher_val", teacher_val)
        if name == "kd-e2e":
            ax.plot([p["time_s"] for p in m["timeline"]], [p["val_acc"] for p in m["timeline"]], "s-",
                    label="end-to-end KD")
        elif m.get("timeline") and (m["world_size"] == 1 or m.get("hybrid")):
            ax.plot([p["time_s"] for p in m["timeline"]], [p["val_acc"] for p in m["timeline"]], "o-",
                    label=f"{name} (fine-tune epochs)")
    if teacher_val is not None:
        ax.axhline(teacher_val - TARGETS["within_points"], color="k", ls="--", lw=0.8, label="teacher - 1 point")
    ax.set_xlabel("seconds (after data loading; teacher shared)")
    ax.set_ylabel("student validation accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title("time to a student close to the teacher")
    atomic_io.savefig(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def _parse_ranks(text: str | None, cores: int) -> list[int]:
    if text is None:  # 1, 2 and powers of two while the cores allow one core per rank (at most 8)
        ranks, n = [1, 2], 4
        while n <= min(cores, 8):
            ranks.append(n)
            n *= 2
        return ranks
    try:
        ranks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--ranks: expected comma-separated integers like 1,2, got {text!r}") from None
    if not ranks or ranks[0] < 1:
        raise SystemExit(f"--ranks: every rank count must be >= 1, got {text!r}")
    return sorted({1, *ranks})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=None, help="config name or YAML (default: digits-vgg16; tiny with --quick)")
    p.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    p.add_argument("--ranks", default=None,
                   help="comma-separated rank counts (default: 1,2 and more powers of two while cores allow)")
    p.add_argument("--quick", action="store_true", help="smoke test: the tiny config, 2 KD epochs")
    p.add_argument("--kd-epochs", type=int, default=None,
                   help="end-to-end KD epochs (default: teacher.epochs; 2 with --quick)")
    p.add_argument("--kd-lr", type=float, default=0.02,
                   help="end-to-end KD learning rate (default 0.02: on digits-vgg16 with all 13 blocks replaced, "
                        "12 epochs reached 88%% test accuracy vs 73%% at the teacher's 0.05)")
    p.add_argument("--no-kd", action="store_true",
                   help="skip the end-to-end KD baseline (e.g. for a schedule-only comparison on a large teacher)")
    p.add_argument("--scaling-only", action="store_true",
                   help="only the PBKD rank counts and the ceilings (no sequential schedule, no KD baseline): "
                        "the scaling check `make bench-quick` runs before every stop")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="run.device for every run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every run (repeatable)")
    p.add_argument("--mpirun", default=None, help="MPI launcher (default: the venv's bundled mpirun)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every PBKD configuration this many times, in interleaved rounds, and keep the "
                        "round with the median distillation makespan (a noisy machine's drift then hits "
                        "every configuration alike); the KD baseline runs once")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    p.add_argument("--reuse", action="store_true",
                   help="keep runs whose report already exists under OUT/runs (re-tabulate without re-running)")
    return p


@dataclass(frozen=True)
class Setup:
    """What every run of one bench shares: the job, the machine's split into ranks and threads, the
    launcher, the environment and the command-line choices."""

    config: str
    out: Path
    ranks: list[int]
    cores: int
    threads: int                 # per rank, for every run
    sets: list[str]              # --set overrides for every run (with --device)
    env: dict[str, str]
    mpirun: str
    kd_epochs: int | None
    kd_lr: float
    timeout: float
    reuse: bool
    rounds: int

    @property
    def teacher_pt(self) -> Path:
        return self.out / "teacher" / "teacher.pt"

    @property
    def common(self) -> list[str]:
        return ["-c", self.config] + sum((["--set", s] for s in self.sets), [])

    @property
    def shared(self) -> list[str]:
        """The options every timed run gets: equal threads, the one shared teacher."""
        return self.common + ["--set", f"run.threads={self.threads}", "--set", f"teacher.checkpoint={self.teacher_pt}"]

    def settings(self, quick: bool, n_train: int) -> dict[str, Any]:
        return {"config": self.config, "ranks": self.ranks, "threads": self.threads, "cores": self.cores,
                "quick": quick, "kd_epochs": self.kd_epochs, "kd_lr": self.kd_lr, "overrides": self.sets,
                "n_train": n_train, "mpirun": self.mpirun, "teacher_checkpoint": str(self.teacher_pt)}


def _setup(args: argparse.Namespace) -> Setup:
    cores = available_cores()
    ranks = _parse_ranks(args.ranks, cores)
    threads = max(1, cores // max(ranks))
    return Setup(config=args.config or ("tiny" if args.quick else "digits-vgg16"), out=Path(args.out).resolve(),
                 ranks=ranks, cores=cores, threads=threads,
                 # the paper's student and rule, so the schedules compare on the paper's workload
                 # (the per-block choice among candidates is benchmarks.select_bench's)
                 sets=[*PAPER_STUDENT, *args.overrides] + ([f"run.device={args.device}"] if args.device else []),
                 env=_env(threads), mpirun=_mpirun(args.mpirun),
                 kd_epochs=args.kd_epochs if args.kd_epochs is not None else (2 if args.quick else None),
                 kd_lr=args.kd_lr, timeout=args.timeout, reuse=args.reuse, rounds=max(1, args.repeat))


def _announce(setup: Setup, hw: dict[str, Any], device: str) -> str | None:
    """Print the bench's plan and its warnings; returns the note on ranks sharing GPUs, if any."""
    ranks, cores = setup.ranks, setup.cores
    if max(ranks) > cores:
        print(f"[bench] warning: {max(ranks)} ranks on {cores} cores: ranks will time-share cores", flush=True)
    gpu_note = None
    if hw.get("gpus") and device != "cpu" and max(ranks) > len(hw["gpus"]):
        gpu_note = f"{max(ranks)} ranks share {len(hw['gpus'])} GPU(s): multi-rank runs time-share a GPU"
        print(f"[bench] warning: {gpu_note}", flush=True)
    print(f"[bench] {setup.config}: ranks {ranks}, {setup.threads} thread(s) per rank on {cores} cores "
          f"({hw.get('cpu_model')}), torch {hw.get('torch')}, GPU {', '.join(hw.get('gpus') or []) or 'none'}; "
          f"out {setup.out}", flush=True)
    return gpu_note


def _train_teacher(setup: Setup) -> bool:
    """The teacher, once, with every core (shared by all runs, never timed against anything)."""
    log = setup.out / "logs" / "teacher.log"
    cmd = [sys.executable, "-m", "hpc_bkd", "train-teacher", *setup.common, "--run-dir", str(setup.teacher_pt.parent),
           "--set", f"run.threads={setup.cores}"]
    rc, secs = _execute(cmd, log, _env(setup.cores), setup.timeout)
    print(f"[bench] teacher: {'ok' if rc == 0 else f'FAILED (rc {rc})'} in {secs:.0f}s", flush=True)
    if rc != 0 or not setup.teacher_pt.is_file():
        print(_tail(log), file=sys.stderr)
        return False
    return True


def _command(setup: Setup, spec: RunSpec, run_dir: Path, accepted: list[str] | None) -> list[str]:
    extra = sum((["--set", s] for s in spec.sets), [])
    if spec.kind == "kd":
        cmd = [sys.executable, "-m", "benchmarks.baseline", *setup.shared, *extra, "--run-dir", str(run_dir),
               "--lr", str(setup.kd_lr)]
        if setup.kd_epochs is not None:
            cmd += ["--epochs", str(setup.kd_epochs)]
        if accepted is not None:  # the very architecture PBKD-1 produced (rejected blocks stay teacher layers)
            cmd += ["--blocks", ",".join(accepted)]
        return cmd
    cmd = [sys.executable, "-m", "hpc_bkd", "run", *setup.shared, *extra, "--run-dir", str(run_dir)]
    return [setup.mpirun, "-np", str(spec.ranks), *cmd] if spec.ranks > 1 else cmd


def _run_one(setup: Setup, spec: RunSpec, round_: int, accepted: list[str] | None, n_train: int) -> dict[str, Any]:
    """Run (or, with --reuse, re-read) one round of one configuration; its entry in bench.json."""
    tag = spec.name if setup.rounds == 1 else f"{spec.name}-r{round_ + 1}"
    run_dir = setup.out / "runs" / tag
    result_file = run_dir / (KD_RESULT_FILE if spec.kind == "kd" else "report.json")
    cmd = _command(setup, spec, run_dir, accepted)
    entry: dict[str, Any] = {**asdict(spec), "cmd": " ".join(cmd), "log": str(setup.out / "logs" / f"{tag}.log"),
                             "result": str(result_file)}
    secs: float | None
    if setup.reuse and result_file.is_file():
        rc, secs = 0, None
        entry["reused"] = True
        print(f"[bench] {tag}: reusing {result_file}", flush=True)
    else:
        if run_dir.exists():  # a stale run dir would be resumed (finished blocks skipped): start clean
            shutil.rmtree(run_dir)
        print(f"[bench] {tag} ({spec.what}) ...", flush=True)
        c0 = _cpu_counters()
        rc, secs = _execute(cmd, Path(entry["log"]), setup.env, setup.timeout)
        entry["contention"] = _contention(c0, _cpu_counters(), secs)
    entry.update({"rc": rc, "process_s": secs})
    entry.setdefault("contention", None)
    if rc == 0 and result_file.is_file():
        entry["metrics"] = (kd_metrics(KDRecord.load(result_file)) if spec.kind == "kd"
                            else pbkd_metrics(JobRecord.load(result_file), n_train))
        entry["metrics"]["contention"] = entry["contention"]
        if (run_dir / "gantt.png").is_file():
            entry["gantt_src"] = str(run_dir / "gantt.png")
        if secs is not None:
            print(f"[bench] {tag}: done in {secs:.0f}s", flush=True)
    else:
        entry["error"] = _tail(Path(entry["log"]))
        print(f"[bench] {tag}: FAILED (rc {rc}); last lines of {entry['log']}:\n{entry['error']}", flush=True)
    return entry


def _run_all(setup: Setup, specs: list[RunSpec], n_train: int) -> dict[str, dict[str, Any]]:
    """PBKD runs in interleaved rounds (the median makespan's round is kept), the KD baseline once,
    after the last round's pbkd-1 (it trains the architecture PBKD-1 produced)."""
    tries: dict[str, list[dict[str, Any]]] = {spec.name: [] for spec in specs}
    runs: dict[str, dict[str, Any]] = {}
    for round_ in range(setup.rounds):
        for spec in specs:
            if spec.kind == "kd" and round_ < setup.rounds - 1:
                continue
            accepted = (runs.get("pbkd-1", {}).get("metrics") or {}).get("accepted")
            tries[spec.name].append(_run_one(setup, spec, round_ if spec.kind != "kd" else 0, accepted, n_train))
            runs[spec.name] = median_round(tries[spec.name])
    for name, entry in runs.items():
        if entry.get("gantt_src"):
            shutil.copyfile(entry["gantt_src"], setup.out / f"gantt-{name}.png")
            entry["gantt"] = f"gantt-{name}.png"
    return runs


def _ceiling(setup: Setup) -> tuple[dict[str, Any] | None, list[str]]:
    """The ceilings (multi-rank benches only) and the notes that explain them: the real-work one
    (``real_work_ceiling``, the one targets compare with) and the fixed-loop one (``machine_ceiling``)."""
    if max(setup.ranks) <= 1:
        return None, []
    n = max(setup.ranks)
    real = real_work_ceiling(setup, n)
    loop = machine_ceiling(n, setup.env)
    print(f"[bench] real-work ceiling: the 1-rank distillation took {real['alone_s']:.2f}s alone and "
          f"{'/'.join(f'{t:.2f}' for t in real['together_s'])}s as {n} concurrent copies: "
          f"{real['efficiency_ceiling']:.2f}; fixed student loop: {loop['efficiency_ceiling']:.2f}", flush=True)
    return {**real, "fixed_loop": loop}, [
        f"Real-work ceiling: the job's own 1-rank distillation (hpc_bkd distill, pbkd-1's settings) took "
        f"{real['alone_s']:.2f}s alone and {sum(real['together_s']) / n:.2f}s on average as {n} independent "
        f"concurrent copies: this work scales at {real['efficiency_ceiling']:.2f} efficiency on this machine, "
        "the bound parallel efficiency is compared with (efficiency / ceiling).",
        f"Fixed-loop ceiling (a depthwise-separable student loop, not the job): {loop['alone_s']:.2f}s alone, "
        f"{max(loop['together_s']):.2f}s in each of {n} concurrent processes: {loop['efficiency_ceiling']:.2f}."]


def _plots_or_none(out: Path, derived: dict[str, Any], runs: dict[str, dict[str, Any]]) -> list[str]:
    try:
        return plots(out, derived, runs)
    except Exception as exc:  # plots must not cost the numbers
        print(f"[bench] could not draw plots: {exc}", file=sys.stderr)
        return []


def _write(out: Path, report: dict[str, Any], text: str, ttext: str, notes: list[str], started: float) -> None:
    atomic_io.write_json(out / "bench.json", report)
    atomic_io.write_text(out / "bench.txt", text + "\n\n" + ttext + "\n\n" + "\n".join(notes) + "\n")
    print("\n" + text + "\n\n" + ttext + "\n")
    for n in notes:
        print(n)
    hw, runs = report["hardware"], report["runs"]
    print(f"\n[bench] {len([r for r in runs.values() if r.get('metrics')])}/{len(runs)} runs ok in "
          f"{time.time() - started:.0f}s (load average {hw['loadavg_start']} -> {hw['loadavg_end']}); wrote "
          f"{out / 'bench.json'}, {out / 'bench.txt'}, {', '.join(report['plots'])}")


def main(argv: list[str] | None = None) -> int:
    from hpc_bkd.config import ConfigError, load_config
    from hpc_bkd.data.sources import load_data

    args = build_parser().parse_args(argv)
    setup = _setup(args)
    setup.out.mkdir(parents=True, exist_ok=True)
    try:
        cfg = load_config(setup.config, setup.sets)
    except ConfigError as exc:
        print(f"hpc-bkd bench: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    hw = hardware(setup.env)
    gpu_note = _announce(setup, hw, cfg.run.device)
    n_train = len(load_data(cfg.data, cfg.run.seed).train)
    started = time.time()
    load_start = _loadavg()
    if not _train_teacher(setup):
        return EXIT_FAILED
    specs = plan_runs(setup.ranks, kd=not (args.no_kd or args.scaling_only), sequential=not args.scaling_only)
    runs = _run_all(setup, specs, n_train)
    ceiling, ceiling_notes = _ceiling(setup)
    derived = derive(runs, setup.ranks, ceiling)
    settings = setup.settings(args.quick, n_train)
    text = table(runs, hw, settings)
    ttext = targets_text(derived["targets"])
    hw["loadavg_start"], hw["loadavg_end"] = load_start, _loadavg()
    notes = cost_model_notes(runs, hw) + ([gpu_note] if gpu_note else []) + ceiling_notes
    pngs = _plots_or_none(setup.out, derived, runs)
    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench",
                             *(argv if argv is not None else sys.argv[1:])]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "bench_wall_s": time.time() - started,
        "hardware": hw, "settings": settings, "definitions": (__doc__ or "").split("Definitions", 1)[-1].strip(),
        "runs": runs, "scaling": derived["scaling"], "targets": derived["targets"], "notes": notes,
        "machine_ceiling": ceiling,
        "plots": pngs + [r["gantt"] for r in runs.values() if r.get("gantt")], "table": text,
    }
    _write(setup.out, report, text, ttext, notes, started)
    return EXIT_OK if all(r.get("metrics") for r in runs.values()) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
