"""The selection benchmark: train candidates once, choose many times (#14).

    python -m benchmarks.select_bench [--config digits-vgg16] [--out bench/results-select]
        [--budgets 0.5,0.6,0.7,0.8,0.9] [--set section.key=value ...]

(from the repository root)

1. ``one-<candidate>``: the job with each candidate alone (distillation only), and ``all``: with
   every candidate of ``blocks.candidates``; the same teacher (trained once by ``train-teacher``),
   the same threads. Their distillation times give the cost of more candidates (against the first
   alone, and against all of them trained alone: shared teacher activations make it less), and
   each run's plan phase its share of the distillation.
2. For every budget: a copy of ``all``'s run directory (teacher, trained units, costs) re-run with
   ``select.budget`` = that budget: nothing is trained again; the choice is made, the student
   assembled, fine-tuned, measured whole and reported.
3. Prints one table (budget, predicted and measured latency at each batch size against the
   teacher's, summed KL, test accuracy) and writes ``select.json`` and ``budgets.png`` (test
   accuracy against measured latency, the teacher for reference).

Every run goes through the real command line in its own process, with ``run.threads`` = all cores.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hpc_bkd.config import job_candidates, load_config
from hpc_bkd.distributed.runtime import available_cores, cpu_model
from hpc_bkd.errors import EXIT_BAD_INPUT
from hpc_bkd.store import atomic_io
from hpc_bkd.store.records import JobRecord

REPO = Path(__file__).resolve().parents[1]
KEEP = ("teacher.pt", "costs.json", "blocks", "config.json")  # what a budget's run reuses


class Infeasible(Exception):
    """A budget no choice meets (the run says the tightest that can be)."""


def _hpc(args: list[str], log: Path) -> None:
    """One real ``python -m hpc_bkd`` run, its output in ``log``; a failure names the log."""
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-m", "hpc_bkd", *args], stdout=out, stderr=subprocess.STDOUT,
                              cwd=REPO).returncode
    if code == EXIT_BAD_INPUT and "cannot be met" in log.read_text():
        raise Infeasible(log.read_text().strip().splitlines()[-1])
    if code:
        raise SystemExit(f"`hpc_bkd {' '.join(args)}` exited {code}; see {log}")


def _sets(pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def distill_time(record: JobRecord) -> float:
    return record.distill.makespan_s


def run_budget(base: Path, out: Path, common: list[str], budget: float) -> JobRecord:
    """Re-run ``base``'s job with ``select.budget`` = ``budget`` in a copy of its run directory."""
    run = out / "runs" / f"budget-{budget:g}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    for name in KEEP:
        src = base / name
        if src.exists():  # no teacher.pt when the teacher came from teacher.checkpoint
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, run / name)
    _hpc(["run", *common, "--run-dir", str(run), *_sets([f"select.budget={budget}"])], out / f"budget-{budget:g}.log")
    return JobRecord.load(run / "report.json")


def budget_row(budget: float, r: JobRecord) -> dict[str, Any]:
    s = r.selection
    assert s is not None
    lat = {b: {"teacher": s.measured[f"teacher_latency_ms@{b}"], "predicted": s.predicted[f"latency_ms@{b}"],
               "measured": s.measured[f"latency_ms@{b}"], "teacher_predicted": s.teacher[f"latency_ms@{b}"]}
           for b in s.layouts}
    return {"budget": budget, "latency_ms": lat, "kl_predicted": s.predicted["kl"],
            "kl_measured": s.measured.get("kl_recalibrated"), "chosen": s.chosen,
            "teacher_test": r.accuracy.teacher_test, "student_test": r.accuracy.student_after_finetune,
            "params": r.models.student.params, "teacher_params": r.models.teacher.params,
            "front": [{"fraction": p.fraction, **p.totals} for p in s.front]}


def table(rows: list[dict[str, Any]], ratio: dict[str, Any]) -> str:
    batches = list(rows[0]["latency_ms"]) if rows else []
    head = f"{'budget':>6} " + " ".join(f"{'ms@' + b + ' pred/meas (teacher)':>30}" for b in batches) + \
        " " + " ".join(f"{'x teacher@' + b + ' pred/meas':>22}" for b in batches) + \
        f" {'speedup':>8} {'KL pred/meas':>14} {'test acc (teacher)':>19}  replaced"
    lines = [head]
    for r in rows:
        cells = []
        for b in batches:
            x = r["latency_ms"][b]
            err = 100 * (x["measured"] / x["predicted"] - 1)
            cells.append(f"{x['predicted']:>8.3f}/{x['measured']:<8.3f}{err:+5.0f}% ({x['teacher']:.3f})")
        # the same as fractions of the teacher timed in the same pass: drift of the machine between passes cancels
        rel = [f"{x['predicted'] / x['teacher_predicted']:.3f}/{x['measured'] / x['teacher']:.3f}"
               f"{100 * (x['measured'] / x['teacher'] / (x['predicted'] / x['teacher_predicted']) - 1):+5.0f}%"
               for x in (r["latency_ms"][b] for b in batches)]
        cells += [f"{c:>22}" for c in rel]
        speed = "/".join(f"{r['latency_ms'][b]['teacher'] / r['latency_ms'][b]['measured']:.2f}" for b in batches)
        kl_meas = f"{r['kl_measured']:.3f}" if r["kl_measured"] is not None else "-"
        replaced = sum(c != "teacher" for c in r["chosen"])
        lines.append(f"{r['budget']:>6g} " + " ".join(f"{c:>30}" for c in cells) + f" {speed:>8} "
                     f"{r['kl_predicted']:>6.3f}/{kl_meas:<7} {r['student_test']:>7.2f} ({r['teacher_test']:.2f})"
                     f"  {replaced}/{len(r['chosen'])}")
    alone = ", ".join(f"{n} {t:.1f}s" for n, t in ratio["alone_s"].items())
    lines.append(f"distillation: {ratio['candidates']} candidates {ratio['all_s']:.1f}s vs 1 candidate "
                 f"{ratio['one_s']:.1f}s = {ratio['ratio']:.2f}x for {ratio['candidates']}x the units; "
                 f"{ratio['ratio_to_alone']:.2f}x the candidates trained alone ({alone}); cost "
                 f"measurement {100 * ratio['plan_share_all']:.1f}% ({ratio['candidates']} candidates) and "
                 f"{100 * ratio['plan_share_one']:.1f}% (1) of the distillation")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = next(iter(rows[0]["latency_ms"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [r["latency_ms"][b]["measured"] for r in rows]
    ax.plot(xs, [r["student_test"] for r in rows], "o-", label="student (after fine-tuning)")
    for r, x in zip(rows, xs):
        ax.annotate(f"{r['budget']:g}", (x, r["student_test"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.plot([rows[0]["latency_ms"][b]["teacher"]], [rows[0]["teacher_test"]], "s", color="black", label="teacher")
    ax.set_xlabel(f"measured latency (ms) at batch {b}, deploy form")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("one set of trained candidates, chosen under each budget")
    ax.legend(fontsize=8)
    atomic_io.savefig(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="digits-vgg16")
    p.add_argument("--out", default="bench/results-select")
    p.add_argument("--budgets", default="0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    sets = [*args.set, f"run.threads={available_cores()}", "run.export=false", "run.measure_inference=false",
            "select.method=budget"]
    cfg = load_config(args.config, sets)
    teacher_dir = out / "runs" / "teacher"
    _hpc(["train-teacher", "-c", args.config, "--run-dir", str(teacher_dir), *_sets(sets)], out / "teacher.log")
    common = ["-c", args.config, *_sets([*sets, f"teacher.checkpoint={teacher_dir / 'teacher.pt'}"])]
    train = ["finetune.epochs=0", "select.budget=1.0"]  # always feasible: these runs only train
    names = [c.name for c in job_candidates(cfg)]
    singles = {}
    for name, extra in [*((f"one-{n}", [f"blocks.candidates={n}", *train]) for n in names), ("all", train)]:
        shutil.rmtree(out / "runs" / name, ignore_errors=True)
        _hpc(["run", *common, "--run-dir", str(out / "runs" / name), *_sets(extra)], out / f"{name}.log")
        singles[name] = JobRecord.load(out / "runs" / name / "report.json")
    every, one = singles.pop("all"), singles[f"one-{names[0]}"]
    alone = sum(distill_time(r) for r in singles.values())
    ratio = {"candidates": len(names), "one_s": distill_time(one), "all_s": distill_time(every),
             "alone_s": {n.removeprefix("one-"): distill_time(r) for n, r in singles.items()},
             "ratio": distill_time(every) / distill_time(one), "ratio_to_alone": distill_time(every) / alone,
             "plan_share_one": one.phases_s.get("plan", 0.0) / distill_time(one),
             "plan_share_all": every.phases_s.get("plan", 0.0) / distill_time(every)}
    rows, infeasible = [], []
    for b in (float(x) for x in args.budgets.split(",")):
        try:
            rows.append(budget_row(b, run_budget(out / "runs" / "all", out, common, b)))
        except Infeasible as exc:
            infeasible.append({"budget": b, "message": str(exc)})
            print(f"budget {b:g}: {exc}")
    text = table(rows, ratio) + "".join(f"\nbudget {x['budget']:g}: {x['message']}" for x in infeasible)
    print(text)
    hardware = {"cpu": cpu_model(), "cores": available_cores()}
    atomic_io.write_json(out / "select.json", {"config": args.config, "overrides": args.set, "hardware": hardware,
                                               "candidates": ratio, "budgets": rows, "infeasible": infeasible,
                                               "wall_s": time.time() - started})
    atomic_io.write_text(out / "select.txt", text + "\n")
    if rows:
        plot(rows, out / "budgets.png")
    print(f"wrote {out / 'select.json'}, {out / 'select.txt'}, {out / 'budgets.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
