"""The exported (mixed-precision) student against the teacher in fp32 and the whole teacher in
int8 ("just quantize the teacher"), in ONNX Runtime.

    python -m benchmarks.int8_bench --run-dir runs/default --out bench/results-int8 [--threads 1]

Needs a run exported with ``select.precisions: [fp32, int8]`` (``run.export: true``). The teacher
is exported fp32 and quantized the way the job quantizes (static QDQ, per-channel weights, the
job's calibration method and images); the three files are timed at each ``--batches`` in
interleaved rounds (``deploy_runtime.interleaved``: the fastest round's median), so a burst of
load slows all alike. Accuracies come from ``model.json`` (the export checked them on the whole
test split). Prints a table and writes ``int8.json``.
"""
from __future__ import annotations

import argparse
import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpc_bkd.deploy.export import MODEL_JSON, load_eval_split, load_run
from hpc_bkd.deploy.form import deploy_form, random_input
from hpc_bkd.deploy.formats import INPUT_NAME, export_onnx, ort_session
from hpc_bkd.deploy.runtimes import image_batches, interleaved, quantize_int8
from hpc_bkd.distributed.runtime import cpu_model
from hpc_bkd.store import atomic_io
from hpc_bkd.store.rundir import RunDir


def measure(run_dir: Path, threads: int, batches: list[int], rounds: int) -> dict[str, Any]:
    """Milliseconds per batch of the three files, and their test accuracies."""
    run = load_run(run_dir)
    export_dir = RunDir(run_dir).export_dir
    card = json.loads((export_dir / MODEL_JSON).read_text())
    s = run.config.select
    with tempfile.TemporaryDirectory(prefix="int8_bench_") as tmp:
        fp32, int8 = Path(tmp) / "teacher.onnx", Path(tmp) / "teacher-int8.onnx"
        export_onnx(deploy_form(run.teacher), run.input_shape, fp32)
        quantize_int8(fp32, int8, image_batches(load_eval_split(run.config).data, s.calibration_images),
                      s.calibration)
        files = {"teacher fp32": fp32, "teacher int8": int8, "student (exported)": export_dir / "student.onnx"}
        runs: list[dict[int, Callable[[], object]]] = []
        for path in files.values():
            session = ort_session(path, threads)
            runs.append({b: functools.partial(session.run, None, {INPUT_NAME: random_input(run.input_shape, b).numpy()})
                         for b in batches})
        table = interleaved(runs, batches, rounds)
    baseline = card.get("int8_teacher_baseline", {})
    acc = {"teacher fp32": card["test_accuracy"]["teacher"], "teacher int8": baseline.get("test_accuracy"),
           "student (exported)": card["test_accuracy"].get("student.onnx")}
    return {"cpu": cpu_model(), "threads": threads, "batches": batches, "per_block": card["model"]["per_block"],
            "ms": dict(zip(files, table)), "test_accuracy": acc}


def describe(r: dict[str, Any]) -> str:
    head = f"ONNX Runtime, {r['cpu']}, {r['threads']} thread(s): ms per batch (speed-up of the student)"
    lines = [head, f"{'model':<20} " + " ".join(f"{'batch ' + str(b):>18}" for b in r["batches"]) + "  test acc"]
    student = r["ms"]["student (exported)"]
    for name, ms in r["ms"].items():
        cells = " ".join(f"{ms[str(b)]:>9.3f} ({ms[str(b)] / student[str(b)]:>5.2f}x)" for b in r["batches"])
        acc = r["test_accuracy"][name]
        lines.append(f"{name:<20} {cells}  {acc if acc is None else f'{acc:.2f}%'}")
    chosen = ", ".join(f"{b['block']}:{b['option']}{'/int8' if b['precision'] == 'int8' else ''}"
                       for b in r["per_block"])
    return "\n".join(lines + [f"per block: {chosen}"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench/results-int8"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    result = measure(args.run_dir, args.threads, [int(b) for b in args.batches.split(",")], args.rounds)
    text = describe(result)
    atomic_io.write_json(args.out / "int8.json", result)
    atomic_io.write_text(args.out / "int8.txt", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
