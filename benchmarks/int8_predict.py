"""The selection's prediction against the whole student, in ONNX Runtime, on a finished run's
trained units: every option measured again (``choose.measure_options``) at ``--threads``, the
job's choice made again (``choose.select``), the chosen student assembled from the distilled
units and timed whole beside the teacher and the int8 teacher (``choose.check_prediction``).

    python -m benchmarks.int8_predict --run-dir RUN [--threads 1]

Needs a run of ``select.method: budget`` (its ``blocks/`` files). Prints the choice, the options'
preparation times and predicted vs measured latency at each ``select.latency_batches``; writes
``predict.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hpc_bkd.blocks.candidates import Candidate
from hpc_bkd.blocks.students import build_candidate
from hpc_bkd.blocks.surgery import assemble
from hpc_bkd.deploy.export import load_eval_split, load_run
from hpc_bkd.deploy.runtimes import FP32, OnnxRuntime
from hpc_bkd.distill.distiller import BlockResult
from hpc_bkd.distributed.runtime import cpu_model
from hpc_bkd.job.stages import candidate_units
from hpc_bkd.selection.options import (
    TrainedUnits,
    check_prediction,
    choose_within_budget,
    describe_selection,
    measure_options,
)
from hpc_bkd.store import atomic_io
from hpc_bkd.store.rundir import RunDir


def measure(run_dir: Path, threads: int) -> dict[str, Any]:
    run = load_run(run_dir)
    cfg = run.config
    units = candidate_units(cfg, run.teacher, list(run.blocks))
    results = {u.id: BlockResult.from_dict(RunDir(run_dir).load_block(u)) for u in units}
    data = load_eval_split(cfg).data
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    t = TrainedUnits(run.teacher, run.blocks, units, results, 0.0, run.input_shape, cfg.run.seed, cpu, threads, data,
                     cfg.data.eval_batch_size)
    s = cfg.select
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="int8_predict_") as tmp:
        measured = measure_options(t, s.latency_batches, OnnxRuntime(threads, Path(tmp), s.calibration),
                                   ("fp32", "int8"), s.calibration_images)
    options_s = time.perf_counter() - t0
    selection = choose_within_budget(s, measured, options_s)
    chosen = [o for o in selection.options if o.chosen]
    students = {}
    for o in chosen:
        if o.unit is None:
            continue
        students[o.block] = build_candidate(run.blocks[o.block], Candidate.parse(units[o.unit].candidate),
                                            cfg.run.seed, run.teacher)
        students[o.block].load_state_dict(results[o.unit].state_dict)
    student = assemble(run.teacher, {b: m.eval() for b, m in students.items()}, run.blocks)
    checked = check_prediction(selection, student, run.teacher, run.input_shape, {}, cpu, threads, run.blocks,
                               {o.block: o.precision for o in chosen if o.precision != FP32}, data, s)
    assert checked.measured is not None
    rows = {b: {"predicted": selection.predicted[f"latency_ms@{b}"], "measured": checked.measured[f"latency_ms@{b}"],
                "teacher": checked.measured[f"teacher_latency_ms@{b}"],
                "teacher_int8": checked.measured.get(f"teacher_int8_latency_ms@{b}")} for b in s.latency_batches}
    return {"cpu": cpu_model(), "threads": threads, "options_s": options_s, "choice": describe_selection(selection),
            "latency_ms": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench/results-int8"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("onnx_ir", "onnxscript", "onnxruntime", "torch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    r = measure(args.run_dir, args.threads)
    lines = [f"ONNX Runtime, {r['cpu']}, {r['threads']} thread(s); options measured in {r['options_s']:.1f}s",
             *r["choice"]]
    for b, row in r["latency_ms"].items():
        lines.append(f"batch {b}: predicted {row['predicted']:.3f} ms, measured {row['measured']:.3f} ms "
                     f"({100 * (row['measured'] / row['predicted'] - 1):+.1f} %); teacher {row['teacher']:.3f} ms, "
                     f"int8 teacher {row['teacher_int8']:.3f} ms")
    atomic_io.write_json(args.out / "predict.json", r)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
