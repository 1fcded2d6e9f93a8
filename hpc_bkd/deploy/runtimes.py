"""Where the selection times its options: PyTorch eager or ONNX Runtime, fp32 or int8.

A latency-aware choice is only as good as its timings, and deployers do not ship PyTorch eager:
on a CPU, ONNX Runtime runs the same models several times faster at batch 1, and the per-block
speeds differ from eager's. So the runtime the options are timed in is a choice
(``select.runtime``), made through one small interface:

* :class:`TorchRuntime`: each option in deploy form (BatchNorm folded), in the memory layout the
  whole teacher runs fastest in, timed by ``deploy.latency_table`` (interleaved rounds);
* :class:`OnnxRuntime`: each option in deploy form exported to ONNX (``export.export_onnx``) and run
  in an ONNX Runtime CPU session with the configured threads, in the same interleaved rounds. It
  also offers int8: ONNX Runtime's static quantization (QDQ, per-channel weights) calibrated on the
  option's real inputs.

An option is a :class:`Prepared` thing to time; :meth:`module` turns one back into something a
PyTorch forward can call, so a quality score is measured on what is timed (an int8 block runs in
ONNX Runtime inside the teacher's forward).
"""
from __future__ import annotations

import functools
import logging
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from hpc_bkd.deploy.form import cpu_threads, deploy_form, fastest_layout, forward_times, latency_table, random_input

log = logging.getLogger("hpc_bkd")

FP32, INT8 = "fp32", "int8"
ORT_LAYOUT = "NCHW"  # the layout of every exported graph: ONNX Runtime chooses its own internally
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Prepared:
    """One option ready to time: its name, input shape (C, H, W), precision, and what runs it
    (a deploy-form module for PyTorch, an ONNX file for ONNX Runtime)."""

    name: str
    shape: tuple[int, ...]
    precision: str
    model: nn.Module | None = None
    path: Path | None = None


class SelectionRuntime(Protocol):
    """What the selection needs from a runtime: prepare an option, time many in interleaved
    rounds, run one inside a PyTorch forward, and say which precisions it offers."""

    name: str
    precisions: tuple[str, ...]

    def prepare(self, model: nn.Module, shape: Sequence[int], name: str) -> Prepared: ...

    def quantize(self, fp32: Prepared, calibration: Sequence[np.ndarray]) -> Prepared: ...

    def layouts(self, whole: Prepared, batches: Sequence[int]) -> dict[int, str]: ...

    def latency_table(self, items: Sequence[Prepared], layouts: dict[int, str]) -> list[dict[str, float]]: ...

    def module(self, item: Prepared) -> nn.Module: ...

    def call_items(self, shapes: Sequence[tuple[int, ...]]) -> list[Prepared]: ...


class TorchRuntime:
    """PyTorch eager on the job's device: deploy form, the whole teacher's fastest layout."""

    name = "torch"
    precisions: tuple[str, ...] = (FP32,)

    def __init__(self, device: torch.device, threads: int | None) -> None:
        self.device, self.threads = device, threads

    def prepare(self, model: nn.Module, shape: Sequence[int], name: str) -> Prepared:
        return Prepared(name, tuple(shape), FP32, model=deploy_form(model))

    def quantize(self, fp32: Prepared, calibration: Sequence[np.ndarray]) -> Prepared:
        raise ValueError("select.precisions int8 needs select.runtime onnxruntime (int8 is ONNX Runtime's "
                         "static quantization)")

    def layouts(self, whole: Prepared, batches: Sequence[int]) -> dict[int, str]:
        assert whole.model is not None
        return {b: fastest_layout(whole.model, whole.shape, b, self.device, self.threads) for b in batches}

    def latency_table(self, items: Sequence[Prepared], layouts: dict[int, str]) -> list[dict[str, float]]:
        return latency_table([(_model(p), p.shape) for p in items], layouts, self.device, self.threads)

    def module(self, item: Prepared) -> nn.Module:
        return _model(item)

    def call_items(self, shapes: Sequence[tuple[int, ...]]) -> list[Prepared]:
        """Nothing: a block in eager costs the same module call alone as inside the model."""
        return []


def _model(p: Prepared) -> nn.Module:
    if p.model is None:
        raise ValueError(f"{p.name} has no PyTorch module to run")
    return p.model


class OrtModule(nn.Module):
    """An ONNX Runtime session as a module: the exported (possibly int8) option run inside a
    PyTorch forward, on CPU numpy arrays, returning a tensor on the input's device."""

    def __init__(self, session: Any, input_name: str) -> None:
        super().__init__()
        self.session, self.input_name = session, input_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


class CalibrationReader:
    """ONNX Runtime's calibration data reader over a list of input batches."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._items: Iterator[dict[str, np.ndarray]] = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


class OnnxRuntime:
    """ONNX Runtime on the CPU: every option exported (deploy form) to an ONNX file under
    ``workdir``; int8 by static QDQ quantization with per-channel weights."""

    name = "onnxruntime"
    precisions: tuple[str, ...] = (FP32, INT8)

    def __init__(self, threads: int | None, workdir: Path, calibration: str = "minmax") -> None:
        if calibration not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {calibration!r}; valid: {', '.join(CALIBRATION_METHODS)}")
        self.threads, self.workdir, self.calibration = threads, Path(workdir), calibration
        self._files = 0

    def _path(self, name: str) -> Path:
        self._files += 1
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        return self.workdir / f"{self._files:03d}-{safe}.onnx"

    def prepare(self, model: nn.Module, shape: Sequence[int], name: str) -> Prepared:
        from hpc_bkd.deploy.formats import export_onnx

        path = self._path(name)
        export_onnx(deploy_form(model).cpu(), shape, path)  # ONNX Runtime runs on the CPU
        return Prepared(name, tuple(shape), FP32, path=path)

    def quantize(self, fp32: Prepared, calibration: Sequence[np.ndarray]) -> Prepared:
        assert fp32.path is not None
        path = self._path(f"{fp32.name}-int8")
        quantize_int8(fp32.path, path, calibration, self.calibration)
        return Prepared(f"{fp32.name}-int8", fp32.shape, INT8, path=path)

    def quantize_blocks(self, fp32: Prepared, members: Sequence[str], calibration: Sequence[np.ndarray]) -> Prepared:
        """A whole model (exported fp32) with only the nodes of the modules ``members`` (and
        everything under them) in int8: the mixed-precision student."""
        assert fp32.path is not None
        path = self._path(f"{fp32.name}-mixed")
        quantize_int8(fp32.path, path, calibration, self.calibration, nodes=module_nodes(fp32.path, members))
        return Prepared(f"{fp32.name}-mixed", fp32.shape, INT8, path=path)

    def layouts(self, whole: Prepared, batches: Sequence[int]) -> dict[int, str]:
        return {b: ORT_LAYOUT for b in batches}

    def session(self, item: Prepared) -> Any:
        from hpc_bkd.deploy.formats import ort_session

        if item.path is None:
            raise ValueError(f"{item.name} has no ONNX file to run")
        return ort_session(item.path, self.threads)

    def latency_table(self, items: Sequence[Prepared], layouts: dict[int, str]) -> list[dict[str, float]]:
        """As ``deploy.latency_table``, in ONNX Runtime: every item in interleaved rounds, keeping
        its fastest round's median, so a burst of load slows one round of every item alike."""
        from hpc_bkd.deploy.formats import INPUT_NAME

        runs: list[dict[int, Callable[[], object]]] = []
        for p in items:
            sess = self.session(p)
            runs.append({b: functools.partial(sess.run, None, {INPUT_NAME: random_input(p.shape, b).numpy()})
                         for b in layouts})
        return interleaved(runs, list(layouts))

    def module(self, item: Prepared) -> nn.Module:
        from hpc_bkd.deploy.formats import INPUT_NAME

        return OrtModule(self.session(item), INPUT_NAME)

    def call_items(self, shapes: Sequence[tuple[int, ...]]) -> list[Prepared]:
        """Per input shape, an ONNX graph that only copies its input: what one session call costs
        with no work (the call itself, the input and output copies). A block timed as a session of
        its own pays this; inside the whole model it does not, so the selection subtracts it from
        each block (the whole model's one call stays in the rest of the teacher)."""
        import onnx
        from onnx import TensorProto, helper

        from hpc_bkd.deploy.formats import INPUT_NAME, OUTPUT_NAME

        out = []
        for shape in dict.fromkeys(tuple(s) for s in shapes):
            dims: list[int | str] = ["batch", *shape]
            graph = helper.make_graph([helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME], name="copy")],
                                      "call", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, dims)],
                                      [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, dims)])
            path = self._path("call-" + "x".join(map(str, shape)))
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
            out.append(Prepared(f"call {shape}", tuple(shape), FP32, path=path))
        return out


def interleaved(runs: Sequence[dict[int, Callable[[], object]]], batches: Sequence[int],
                rounds: int = 3) -> list[dict[str, float]]:
    """Milliseconds per call of each item's run at each batch: ``rounds`` interleaved rounds, the
    fastest round's median (the rule of ``deploy.latency_table``)."""
    cpu = torch.device("cpu")
    best: list[dict[str, float]] = [{str(b): float("inf") for b in batches} for _ in runs]
    for _ in range(rounds):
        for row, per_batch in zip(best, runs):
            for b in batches:
                n, warm = (15, 3) if b == 1 else (4, 1)
                row[str(b)] = min(row[str(b)], statistics.median(forward_times(per_batch[b], n, warm, cpu)))
    return best


_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def quantize_int8(source: Path, target: Path, calibration: Sequence[np.ndarray], method: str = "minmax",
                  nodes: Sequence[str] | None = None) -> None:
    """ONNX Runtime static quantization of ``source`` into ``target``: QDQ format, int8 weights per
    output channel, int8 activations whose ranges come from ``calibration`` (input batches) by
    ``method``. ``nodes``: quantize only these nodes (None: every quantizable one)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError("int8 quantization needs calibration inputs (none given)")
    # ONNX Runtime's recommended pre-processing (shape inference; its graph optimisation is skipped:
    # it would rename the nodes ``nodes`` names), then S8S8 QDQ, its recommended first choice on x86
    prepared = target.with_name(target.stem + ".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_optimization=True)
    try:
        _quantize(prepared, target, calibration, method, nodes)
    finally:
        prepared.unlink(missing_ok=True)


def _quantize(source: Path, target: Path, calibration: Sequence[np.ndarray], method: str,
              nodes: Sequence[str] | None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from hpc_bkd.deploy.formats import INPUT_NAME

    quantize_static(str(source), str(target), CalibrationReader(INPUT_NAME, calibration),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, _METHODS[method]),
                    nodes_to_quantize=list(nodes) if nodes is not None else None,
                    calibration_providers=["CPUExecutionProvider"])


def module_nodes(path: Path, members: Sequence[str]) -> list[str]:
    """The nodes of the ONNX file ``path`` (written by torch's exporter) that come from the modules
    ``members`` or their children: the exporter records each node's module path in its
    ``pkg.torch.onnx.name_scopes`` metadata."""
    import ast

    import onnx

    def inside(scopes: list[str]) -> bool:
        return any(s == m or s.startswith(m + ".") for s in scopes for m in members)

    nodes = []
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        if node.name and inside([str(s) for s in scopes]):
            nodes.append(node.name)
    if members and not nodes:
        raise ValueError(f"no node of {path.name} comes from {', '.join(members)}: cannot quantize those blocks "
                         "alone (the exporter recorded no module paths?)")
    return nodes


def image_batches(data: Any, images: int, batch: int = 32) -> list[np.ndarray]:
    """The first ``images`` training images, normalised as for evaluation, as numpy batches: what
    the int8 calibration of a whole model runs on."""
    from hpc_bkd.data.batches import eval_batches

    n = min(images, len(data.train))
    return [x.float().cpu().numpy() for x, _ in eval_batches(data, data.train, min(batch, n), range(0, n))]


def onnxruntime_missing() -> str | None:
    """Why ONNX Runtime cannot time options here (the export extra is not installed), or None."""
    from hpc_bkd.deploy.formats import missing_extra

    return missing_extra("onnx")


def make_runtime(name: str, device: torch.device, threads: int | None, workdir: Path,
                 calibration: str = "minmax") -> SelectionRuntime:
    """The runtime ``select.runtime`` names (``auto``: ONNX Runtime when the export extra is
    installed and the job runs on the CPU, else PyTorch, said once in the log)."""
    if name == "auto":
        why = onnxruntime_missing() or (f"the job runs on {device.type}" if device.type != "cpu" else None)
        if why:
            log.info("selection: options are timed in PyTorch eager (%s)", why)
            name = "torch"
        else:
            name = "onnxruntime"
    if name == "onnxruntime":
        why = onnxruntime_missing()
        if why:
            raise ValueError(f"select.runtime onnxruntime: {why}")
        return OnnxRuntime(threads, workdir, calibration)
    return TorchRuntime(device, threads)


__all__ = ["FP32", "INT8", "ORT_LAYOUT", "Prepared", "module_nodes", "image_batches", "SelectionRuntime", "TorchRuntime", "OnnxRuntime", "OrtModule",
           "quantize_int8", "make_runtime", "interleaved", "cpu_threads"]
