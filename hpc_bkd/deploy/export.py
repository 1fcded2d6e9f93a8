"""Standalone export of a finished run: files a deployer can load without hpc_bkd.

``student.pt`` can only be rebuilt by hpc_bkd (architecture, block surgery, student builder). This
module writes the student (and optionally the teacher, the user's baseline) in its deploy form
(eval mode, BatchNorm folded, see ``deploy``) as

* ``<run>/export/student.pt2``: a ``torch.export`` ExportedProgram (``torch.export.load(p).module()``),
* ``<run>/export/student.onnx``: ONNX, checked with ``onnx.checker`` and run with ONNX Runtime,
* ``<run>/export/model.json``: everything needed to feed it images and to judge it: input shape and
  normalisation, classes, accepted blocks, test accuracy, params, MACs, measured latency (eager,
  exported, ONNX Runtime), toolkit version and the teacher's fingerprint.

Both model files take a float32 NCHW batch of any size, normalised as model.json says, and return
logits. Every exported file is loaded back and run on the test split; its largest difference from
the in-toolkit student is written to model.json.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpc_bkd import __version__
from hpc_bkd.blocks.surgery import BlockSpec
from hpc_bkd.config import Config, config_from_dict
from hpc_bkd.data.batches import Data, eval_batches
from hpc_bkd.data.sources import SOURCES, load_data
from hpc_bkd.deploy.form import (
    InferenceMeasurement,
    TimingPlan,
    compare,
    count_batchnorms,
    deploy_form,
    measure_callable,
    measure_inference,
    model_size,
    random_input,
)
from hpc_bkd.deploy.formats import (
    FORMATS,
    INPUT_NAME,
    OUTPUT_NAME,
    _example,
    export_onnx,
    export_pt2,
    ort_session,
    require_formats,
)
from hpc_bkd.store import atomic_io
from hpc_bkd.store.records import Comparison, ExportResult
from hpc_bkd.store.rundir import RunDir

log = logging.getLogger("hpc_bkd")

MODEL_JSON = "model.json"  # under the export directory (``RunDir.export_dir``)


@dataclass(frozen=True)
class RunModels:
    """A finished run rebuilt from its directory."""

    config: Config
    teacher: nn.Module
    student: nn.Module
    blocks: tuple[BlockSpec, ...]
    accepted: tuple[int, ...]
    input_shape: tuple[int, int, int]
    students: dict[str, str] = field(default_factory=dict)  # replaced block -> candidate student
    precisions: dict[str, str] = field(default_factory=dict)  # block -> int8 where the choice quantized it


# ------------------------------------------------------------------------------------ rebuilding


def _student_file(run_dir: RunDir) -> Path:
    path = run_dir.student
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: no finished student in {run_dir}; run "
                                f"`hpc-bkd run --run-dir {run_dir}` (or `hpc-bkd distill`) first")
    return path


def _config(run_dir: RunDir, saved: dict[str, Any] | None) -> Config:
    """The job's config: the one saved with the student, else config.json. Keys this version
    does not know (a run from another version) are dropped rather than refused."""
    raw = saved.get("config") if saved else None
    if raw is None:
        path = run_dir.config
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `hpc-bkd run --run-dir {run_dir}` first")
        raw = atomic_io.load_json(path)
    known = Config().to_dict()
    return config_from_dict({s: {k: v for k, v in (vals or {}).items() if k in known[s]}
                             for s, vals in raw.items() if s in known})


def _num_classes(cfg: Config, state: dict[str, torch.Tensor]) -> int:
    """From the dataset, or (image folders) the classifier: the last 2-d weight of the state."""
    names = _class_names(cfg)
    if names:
        return len(names)
    return int([v for k, v in state.items() if k.endswith("weight") and v.dim() == 2][-1].shape[0])


def _teacher_weights(run_dir: RunDir, cfg: Config) -> Path:
    """The teacher this job distilled: ``teacher.checkpoint`` when set, else the run's cache."""
    if cfg.teacher.checkpoint and Path(cfg.teacher.checkpoint).is_file():
        return Path(cfg.teacher.checkpoint)
    cache = run_dir.teacher
    if cache.is_file():
        return cache
    where = f"teacher.checkpoint={cfg.teacher.checkpoint!r} nor {cache}" if cfg.teacher.checkpoint else str(cache)
    raise FileNotFoundError(f"teacher weights not found ({where} exists): run "
                            f"`hpc-bkd train-teacher --run-dir {run_dir}` or restore the teacher checkpoint")


def _input_shape(cfg: Config) -> tuple[int, int, int]:
    return (3, cfg.data.image_size, cfg.data.image_size)  # every loader yields RGB (digits: replicated)


def load_run(run_dir: str | Path) -> RunModels:
    """Rebuild a finished run's teacher and student (eval mode, on the CPU) from its directory.

    The blocks are found on the loaded teacher, as the job found them: whether a student block
    ends in a ReLU depends on the teacher's activations, not only its architecture.
    """
    from hpc_bkd.blocks.candidates import Candidate, paper_candidate
    from hpc_bkd.blocks.models import build_model
    from hpc_bkd.blocks.students import build_candidate
    from hpc_bkd.blocks.surgery import find_blocks, replace_blocks
    from hpc_bkd.distill.teacher import load_teacher_checkpoint

    paths = RunDir(run_dir)
    saved = atomic_io.load(_student_file(paths))
    cfg = _config(paths, saved)
    classes, shape = _num_classes(cfg, saved["state_dict"]), _input_shape(cfg)
    teacher = load_teacher_checkpoint(_teacher_weights(paths, cfg),
                                      build_model(cfg.model.arch, classes, cfg.model.width, cfg.model.kwargs))
    blocks = find_blocks(teacher.eval(), shape, cfg.blocks.granularity)
    student = build_model(cfg.model.arch, classes, cfg.model.width, cfg.model.kwargs)
    b = cfg.blocks
    paper = paper_candidate(b.student_depth, b.student_width).name  # students.pt of a single-candidate job
    kinds = {int(i): k for i, k in saved.get("students", {}).items()} or {i: paper for i in saved["accepted_blocks"]}
    replace_blocks(student, {i: build_candidate(blocks[i], Candidate.parse(k), cfg.run.seed, teacher)
                             for i, k in kinds.items()}, blocks)
    student.load_state_dict(saved["state_dict"])
    return RunModels(cfg, teacher.eval(), student.eval(), tuple(blocks), tuple(sorted(kinds)), shape,
                     {str(i): k for i, k in sorted(kinds.items())},
                     {str(i): p for i, p in sorted(saved.get("precisions", {}).items(), key=lambda kv: int(kv[0]))})


def load_student(run_dir: str | Path) -> nn.Module:
    """The run's final student as an eval-mode module (``deploy.deploy_form`` folds it for speed)."""
    return load_run(run_dir).student


def load_teacher(run_dir: str | Path) -> nn.Module:
    """The run's teacher as an eval-mode module: the baseline the student is measured against."""
    from hpc_bkd.blocks.models import build_model
    from hpc_bkd.distill.teacher import load_teacher_checkpoint

    paths = RunDir(run_dir)
    cfg = _config(paths, atomic_io.load(paths.student) if paths.student.is_file() else None)
    weights = _teacher_weights(paths, cfg)
    state = atomic_io.load(weights)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    model = build_model(cfg.model.arch, _num_classes(cfg, state), cfg.model.width, cfg.model.kwargs)
    return load_teacher_checkpoint(weights, model).eval()


# ------------------------------------------------------------------------------------ writing


def measure_onnxruntime(path: Path, shape: Sequence[int], plan: TimingPlan, name: str) -> InferenceMeasurement:
    """Latency and throughput of an ONNX file under ONNX Runtime (NCHW, the graph's layout)."""
    session = ort_session(path, plan.threads)
    x1, xb = (random_input(shape, b).numpy() for b in (1, plan.batch_size))
    return measure_callable(lambda: session.run(None, {INPUT_NAME: x1}), lambda: session.run(None, {INPUT_NAME: xb}),
                            shape, plan, name=name, runtime="onnxruntime")


def _loaders(fmt: str, threads: int | None) -> Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]:
    """How to load a written file back and run it on a tensor batch (for checks and timing)."""
    if fmt == "pt2":
        def load_pt2(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
            module = torch.export.load(str(path)).module()
            return lambda x: module(x)
        return load_pt2

    def load_onnx(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
        session = ort_session(path, threads)
        return lambda x: torch.from_numpy(session.run(None, {INPUT_NAME: x.contiguous().numpy()})[0])
    return load_onnx


# ------------------------------------------------------------------------------------ checking


@dataclass(frozen=True)
class EvalSplit:
    """The run's test split, read batch by batch each time it is walked (a streamed ImageNet
    validation set is 30 GB as float batches: it is never held whole), and the normalisation a
    deployer must repeat."""

    data: Data
    batch_size: int

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised (images, labels) batches, in order."""
        return eval_batches(self.data, self.data.test, self.batch_size)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.data.mean.tolist())

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.data.std.tolist())

    @property
    def images(self) -> int:
        return len(self.data.test)


def load_eval_split(cfg: Config) -> EvalSplit:
    """The job's data, loaded as the job loaded it (same seed): the same test images, the same
    training-set mean and std."""
    return EvalSplit(load_data(cfg.data, cfg.run.seed), cfg.data.eval_batch_size)


@torch.inference_mode()
def _evaluate(run: Callable[[torch.Tensor], torch.Tensor], split: EvalSplit) -> tuple[torch.Tensor, float]:
    """Logits of the whole test split and top-1 accuracy in percent."""
    logits, labels = [], []
    for x, y in split.batches():
        logits.append(run(x))
        labels.append(y)
    out, truth = torch.cat(logits), torch.cat(labels)
    return out, 100.0 * int((out.argmax(1) == truth).sum()) / max(len(truth), 1)


def _class_names(cfg: Config) -> list[str] | None:
    """Names for the logits, when the dataset's source knows them (else only the count is known)."""
    source = SOURCES.get(cfg.data.dataset)
    return source.class_names(cfg.data) if source is not None else None


# ------------------------------------------------------------------------------------ the export


def _write_role(role: str, model: nn.Module, formats: Sequence[str], shape: Sequence[int],
                out_dir: Path, int8: Int8Blocks | None = None) -> dict[str, Path]:
    """Write one model (``role``: student or teacher) in each format; returns file name -> path.
    ``int8``: the ONNX file gets these blocks quantized (the .pt2 stays fp32)."""
    deployed = deploy_form(model)
    writers = {"pt2": export_pt2, "onnx": export_onnx}
    written = {}
    for fmt in formats:
        path = out_dir / FORMATS[fmt].format(role=role)
        t0 = time.perf_counter()
        writers[fmt](deployed, shape, path)
        if fmt == "onnx" and int8 is not None and int8.members:
            int8.apply(path)
        log.info("export: wrote %s (%.1fs)", path, time.perf_counter() - t0)
        written[path.name] = path
    return written


@dataclass(frozen=True)
class Int8Blocks:
    """The blocks the choice took in int8 and how to quantize them in an exported ONNX file: ONNX
    Runtime static QDQ quantization of their nodes only, calibrated on training images run
    through the whole student (the inputs each block really sees in the deployed file)."""

    members: tuple[str, ...]          # the modules of those blocks (the exporter's name scopes)
    calibration: tuple[Any, ...]      # numpy input batches
    method: str = "minmax"
    fp32_members: tuple[str, ...] = ()  # the modules of the blocks kept fp32 (the rest is glue)

    def apply(self, path: Path) -> None:
        """Quantize ``path`` in place (written beside it, then renamed over it): the int8 blocks and
        the nodes between two of them (``runtimes.int8_nodes``)."""
        from hpc_bkd.deploy.runtimes import int8_nodes, quantize_int8

        nodes = int8_nodes(path, self.members, self.fp32_members)
        atomic_io.write_atomically(path, lambda tmp: quantize_int8(path, Path(tmp), self.calibration, self.method,
                                                                   nodes), keep_suffix=True)
        import onnx
        onnx.checker.check_model(str(path))

    @staticmethod
    def of(run: RunModels, split: EvalSplit) -> Int8Blocks | None:
        """The run's int8 blocks (None: all fp32)."""
        from hpc_bkd.deploy.runtimes import INT8, image_batches

        by_index = {str(b.index): b for b in run.blocks}
        members = tuple(m for i, p in run.precisions.items() if p == INT8 for m in by_index[i].members)
        if not members:
            return None
        s = run.config.select
        fp32_members = tuple(m for b in run.blocks if run.precisions.get(str(b.index)) != INT8 for m in b.members)
        return Int8Blocks(members, tuple(image_batches(split.data, s.calibration_images)), s.calibration,
                          fp32_members)


def _check_role(model: nn.Module, files: dict[str, Path], split: EvalSplit,
                threads: int | None) -> tuple[float, dict[str, dict[str, float]]]:
    """Test accuracy of the in-toolkit model and, per written file, its accuracy and its largest
    logit difference from that model on the whole test split."""
    reference, acc = _evaluate(model, split)
    checks = {}
    for name, path in files.items():
        logits, file_acc = _evaluate(_loaders(path.suffix.lstrip("."), threads)(path), split)
        checks[name] = {"max_abs_diff": float((logits - reference).abs().max()), "test_accuracy": file_acc}
    return acc, checks


def _measure_role(role: str, model: nn.Module, files: dict[str, Path], shape: Sequence[int],
                  plan: TimingPlan, eager: InferenceMeasurement | None) -> dict[str, InferenceMeasurement]:
    """Eager deploy form (``eager`` when already measured), the loaded ExportedProgram, and ONNX
    Runtime, on the same CPU threads."""
    out = {"eager": eager or measure_inference(model, shape, plan, name=role)}
    for path in files.values():
        if path.suffix == ".pt2":
            module = torch.export.load(str(path)).module()
            out["torch.export"] = measure_inference(module, shape, plan, name=role, deploy=False,
                                                    runtime="torch.export")
        elif path.suffix == ".onnx":
            out["onnxruntime"] = measure_onnxruntime(path, shape, plan, role)
    return out


def _fastest(measured: dict[str, InferenceMeasurement]) -> dict[str, Any]:
    best = min(measured, key=lambda k: measured[k].latency_ms_median)
    rest = [measured[k].latency_ms_median for k in measured if k != best]
    return {"runtime": best, "latency_ms": measured[best].latency_ms_median,
            "margin_vs_next": (min(rest) / measured[best].latency_ms_median) if rest else None}


def _input_card(run: RunModels, split: EvalSplit) -> dict[str, Any]:
    c = run.config.data
    return {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "shape": ["batch", *run.input_shape],
            "color": "RGB" + (" (the grey digit replicated in 3 channels)" if c.dataset == "digits" else ""),
            "image_size": c.image_size, "mean": list(split.mean), "std": list(split.std),
            "preprocessing": f"resize to {c.image_size}x{c.image_size}, scale pixels to [0, 1] (divide by 255), "
                             "then per channel x = (x - mean) / std"}


def _model_card(run: RunModels, split: EvalSplit, files: dict[str, dict[str, Path]],
                checked: dict[str, tuple[float, dict]], latency: dict[str, dict[str, InferenceMeasurement]],
                line: str) -> dict[str, Any]:
    """model.json: everything a deployer needs to feed the files images and to judge them."""
    from hpc_bkd.distill.teacher import state_fingerprint

    cfg = run.config
    classes = _class_names(cfg)
    with torch.no_grad():
        n_classes = int(run.student(_example(run.input_shape)[0]).shape[1])
    return {
        "toolkit": {"name": "hpc_bkd", "version": __version__},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "files": {role: sorted(f) for role, f in files.items()},
        "input": _input_card(run, split),
        "output": {"name": OUTPUT_NAME, "shape": ["batch", n_classes], "meaning": "logits (argmax = class)",
                   "num_classes": n_classes, "class_names": classes},
        "model": {"arch": cfg.model.arch, "width": cfg.model.width, "kwargs": dict(cfg.model.kwargs),
                  "dataset": cfg.data.dataset,
                  "granularity": cfg.blocks.granularity, "blocks": len(run.blocks),
                  "accepted_blocks": list(run.accepted), "students": dict(run.students),
                  "per_block": _per_block(run)},
        # student.onnx holds int8 (QDQ) nodes where a block chose int8; student.pt2 is always fp32
        "precision": {"student.onnx": "mixed int8/fp32 (QDQ)" if "int8" in run.precisions.values() else "fp32",
                      "student.pt2": "fp32"},
        "test_accuracy": {"student": checked["student"][0], "teacher": checked["teacher"][0],
                          "images": split.images,
                          **{name: c["test_accuracy"] for name, c in checked["student"][1].items()}},
        "checks": {role: c[1] for role, c in checked.items()},
        "size": {role: vars(model_size(m, run.input_shape)) for role, m in (("student", run.student),
                                                                              ("teacher", run.teacher))},
        "deploy_form": {role: {"batchnorms": count_batchnorms(m), "batchnorms_after_folding":
                               count_batchnorms(deploy_form(m))} for role, m in
                        (("student", run.student), ("teacher", run.teacher))},
        "latency": {role: {k: v.to_json() for k, v in m.items()} for role, m in latency.items()},
        "fastest": {role: _fastest(m) for role, m in latency.items()},
        "speed": line,  # eager against eager: what the toolkit's own report states
        "speed_by_runtime": {rt: compare(latency["teacher"][rt], m).line for rt, m in latency["student"].items()
                             if rt in latency["teacher"]},
        "teacher_fingerprint": state_fingerprint(run.teacher.state_dict()),
    }


def _per_block(run: RunModels) -> list[dict[str, Any]]:
    """Per block of the teacher: the option the student keeps there and its precision."""
    return [{"block": b.index, "name": b.name, "option": run.students.get(str(b.index), "teacher"),
             "precision": run.precisions.get(str(b.index), "fp32")} for b in run.blocks]


def int8_teacher_baseline(run: RunModels, split: EvalSplit, plan: TimingPlan,
                          student: InferenceMeasurement | None) -> dict[str, Any]:
    """The honest baseline of an int8 student: the whole teacher quantized (the same static QDQ
    quantization, every node, the same calibration images), its test accuracy, and its ONNX
    Runtime speed beside the teacher's fp32 file and the exported student."""
    import tempfile

    from hpc_bkd.deploy.runtimes import image_batches, quantize_int8

    s = run.config.select
    with tempfile.TemporaryDirectory(prefix="hpc_bkd_int8_teacher_") as tmp:
        fp32, int8 = Path(tmp) / "teacher.onnx", Path(tmp) / "teacher-int8.onnx"
        export_onnx(deploy_form(run.teacher), run.input_shape, fp32)
        quantize_int8(fp32, int8, image_batches(split.data, s.calibration_images), s.calibration)
        _, acc = _evaluate(_loaders("onnx", plan.threads)(int8), split)
        t32 = measure_onnxruntime(fp32, run.input_shape, plan, "teacher")
        t8 = measure_onnxruntime(int8, run.input_shape, plan, "teacher-int8")
    out: dict[str, Any] = {"method": f"onnxruntime static QDQ, per-channel weights, {s.calibration} calibration "
                                     f"on {s.calibration_images} training images",
                           "test_accuracy": acc, "teacher_fp32": t32.to_json(), "teacher_int8": t8.to_json()}
    if student is not None:
        out["student_vs_int8_teacher"] = compare(t8, student).line
        out["student_vs_fp32_teacher"] = compare(t32, student).line
    log.info("export: int8 teacher baseline: test accuracy %.2f%%; %s", acc, out.get("student_vs_int8_teacher", ""))
    return out


def export_run(run_dir: str | Path, formats: Sequence[str] = tuple(FORMATS), include_teacher: bool = False,
               plan: TimingPlan | None = None, out_dir: str | Path | None = None,
               eager: Comparison | None = None) -> ExportResult:
    """Export a finished run's student (and, with ``include_teacher``, its teacher) to
    ``<run_dir>/export/``, check every file against the in-toolkit model on the test split,
    measure latency, and write model.json. ``eager``: the deploy form's CPU measurement of this
    run's teacher and student with ``plan``, when the caller has just taken it."""
    formats = require_formats(formats)
    paths = RunDir(run_dir)
    _student_file(paths)  # the clear error before anything is loaded
    run = load_run(paths.root)
    out = Path(out_dir) if out_dir is not None else paths.export_dir
    plan = plan or TimingPlan(batch_size=run.config.data.eval_batch_size, threads=run.config.run.threads or None)
    split = load_eval_split(run.config)
    models = {"student": run.student, "teacher": run.teacher}
    roles = ("student", "teacher") if include_teacher else ("student",)
    int8 = Int8Blocks.of(run, split) if "onnx" in formats else None
    files = {role: _write_role(role, models[role], formats, run.input_shape, out, int8 if role == "student" else None)
             for role in roles}
    checked = {role: _check_role(models[role], files.get(role, {}), split, plan.threads) for role in models}
    latency = {role: _measure_role(role, m, files.get(role, {}), run.input_shape, plan,
                                   getattr(eager, role) if eager is not None else None)
               for role, m in models.items()}
    line = compare(latency["teacher"]["eager"], latency["student"]["eager"]).line
    card = _model_card(run, split, files, checked, latency, line)
    if "onnx" in formats and "int8" in run.config.select.precisions:
        card["int8_teacher_baseline"] = int8_teacher_baseline(run, split, plan, latency["student"].get("onnxruntime"))
    atomic_io.write_json(out / MODEL_JSON, card)
    written = {name: str(path) for f in files.values() for name, path in f.items()}
    diffs = {name: c["max_abs_diff"] for _, per in checked.values() for name, c in per.items()}
    return ExportResult(str(run_dir), str(out), written, str(out / MODEL_JSON), diffs, line)


def _describe(result: ExportResult) -> str:
    """What ``hpc-bkd export`` prints: the files, their check, and the measured speed."""
    card = json.loads(Path(result.model_json).read_text())
    lines = [f"export: {result.export_dir}/ ({', '.join(sorted(Path(p).name for p in result.files))}, "
             f"{MODEL_JSON})"]
    for name, diff in sorted(result.max_abs_diff.items()):
        role = name.split(".")[0]
        acc = card["checks"][role][name]["test_accuracy"]
        lines.append(f"  {name}: test accuracy {acc:.2f}%, max |logit - in-toolkit {role}| {diff:.2e}")
    for role, runtimes in card["latency"].items():
        figures = ", ".join(f"{k} {v['latency_ms_median']:.3f} ms" for k, v in runtimes.items())
        fastest = card["fastest"][role]["runtime"]
        lines.append(f"  {role} batch-1 latency: {figures} (fastest: {fastest})")
    lines += [f"  {runtime}: {text}" for runtime, text in card["speed_by_runtime"].items()]
    return "\n".join(lines)


def export_main(run_dir: Path, formats: Sequence[str], include_teacher: bool) -> ExportResult:
    """``hpc-bkd export --run-dir DIR [--formats pt2,onnx] [--teacher]``: export and print a summary."""
    result = export_run(run_dir, formats, include_teacher)
    print(_describe(result), flush=True)
    return result
