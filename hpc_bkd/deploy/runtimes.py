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
    # exported together with other options (``OnnxRuntime.prepare_rows``): the shared file, and this
    # option's input and output tensors in it, so that all can be quantized in one calibration
    source: tuple[Path, str, str] | None = None


Row = tuple[Sequence[int], Sequence[tuple[nn.Module, str]]]  # a block's input shape, its (option, name)s


class SelectionRuntime(Protocol):
    """What the selection needs from a runtime: prepare an option, time many in interleaved
    rounds, run one inside a PyTorch forward, and say which precisions it offers."""

    name: str
    precisions: tuple[str, ...]

    def prepare(self, model: nn.Module, shape: Sequence[int], name: str) -> Prepared: ...

    def quantize(self, fp32: Prepared, calibration: Sequence[np.ndarray]) -> Prepared: ...

    def prepare_rows(self, rows: Sequence[Row]) -> list[list[Prepared]]: ...

    def quantize_rows(self, rows: Sequence[Sequence[Prepared]], calibration: Sequence[Sequence[np.ndarray]]
                      ) -> list[list[Prepared]]: ...

    def layouts(self, whole: Prepared, batches: Sequence[int]) -> dict[int, str]: ...

    def latency_table(self, items: Sequence[Prepared], layouts: dict[int, str]) -> list[dict[str, float]]: ...

    def module(self, item: Prepared) -> nn.Module: ...

    def conversions(self, items: Sequence[Prepared], batches: Sequence[int]) -> list[dict[str, float]]: ...

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

    def prepare_rows(self, rows: Sequence[Row]) -> list[list[Prepared]]:
        return [[self.prepare(m, shape, name) for m, name in options] for shape, options in rows]

    def quantize_rows(self, rows: Sequence[Sequence[Prepared]], calibration: Sequence[Sequence[np.ndarray]]
                      ) -> list[list[Prepared]]:
        return [[self.quantize(p, cal) for p in row] for row, cal in zip(rows, calibration)]

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

    def conversions(self, items: Sequence[Prepared], batches: Sequence[int]) -> list[dict[str, float]]:
        """Nothing: eager converts no layout at a module's edges (the whole runs in one layout)."""
        return [{str(b): 0.0 for b in batches} for _ in items]


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
    """ONNX Runtime's calibration data reader over a list of input batches (or, for a model of
    several inputs, of feeds: a batch per input name)."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray] | Sequence[dict[str, np.ndarray]]) -> None:
        self._items: Iterator[dict[str, np.ndarray]] = iter([b if isinstance(b, dict) else {input_name: b}
                                                             for b in batches])

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
        self._sessions: dict[Path, Any] = {}  # one per file: timing and scoring share it

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

    def prepare_rows(self, rows: Sequence[Row]) -> list[list[Prepared]]:
        """Every option of every block exported in ONE call of torch's exporter (a module with one
        input per block and one output per option), then each option cut out of that graph as a
        file of its own (``onnx.utils.Extractor``): the same graph a separate export writes, for one
        exporter start instead of one per option (~1 s each, most of the options' preparation).
        Where the joint export fails, each option is exported alone (said in the log)."""
        import onnx

        names = [[name for _, name in options] for _, options in rows]
        parts = [(deploy_form(m).cpu(), i) for i, (_, options) in enumerate(rows) for m, _ in options]
        inputs, outputs = [f"x{i}" for i in range(len(rows))], [f"y{j}" for j in range(len(parts))]
        bundle = self._path("options")
        try:
            _export_bundle(_Bundle([m for m, _ in parts], [i for _, i in parts]).eval(), [s for s, _ in rows], bundle,
                           inputs, outputs)
            extractor = onnx.utils.Extractor(onnx.load(str(bundle)))
        except Exception as exc:  # an exporter limit on the joint module: one export per option
            log.warning("selection: the options could not be exported together (%s: %s); exporting each alone",
                        type(exc).__name__, exc)
            return [[self.prepare(m, shape, name) for m, name in options] for shape, options in rows]
        out, j = [], 0
        for i, (shape, _) in enumerate(rows):
            row = []
            for name in names[i]:
                path = self._path(name)
                _save_part(extractor, inputs[i], outputs[j], path)
                row.append(Prepared(name, tuple(shape), FP32, path=path, source=(bundle, inputs[i], outputs[j])))
                j += 1
            out.append(row)
        return out

    def quantize_rows(self, rows: Sequence[Sequence[Prepared]], calibration: Sequence[Sequence[np.ndarray]]
                      ) -> list[list[Prepared]]:
        """Every option of ``prepare_rows`` quantized in one calibration of their joint graph (each
        block's input fed its own ``calibration`` batches), each then cut out as its own file:
        activation ranges are per tensor and weights per channel, so each option gets the ranges a
        calibration of it alone would give. Options not exported together are quantized one by one."""
        import onnx

        sources = {p.source[0] for row in rows for p in row if p.source is not None}
        if len(sources) != 1 or any(p.source is None for row in rows for p in row):
            return [[self.quantize(p, cal) for p in row] for row, cal in zip(rows, calibration)]
        feeds_by_input = {row[0].source[1]: cal for row, cal in zip(rows, calibration) if row and row[0].source}
        steps = min(len(c) for c in feeds_by_input.values())
        feeds = [{name: batches[k] for name, batches in feeds_by_input.items()} for k in range(steps)]
        bundle = self._path("options-int8")
        quantize_int8(sources.pop(), bundle, feeds, self.calibration)
        extractor = onnx.utils.Extractor(onnx.load(str(bundle)))
        out = []
        for row in rows:
            quantized = []
            for p in row:
                assert p.source is not None
                path = self._path(f"{p.name}-int8")
                _save_part(extractor, p.source[1], p.source[2], path)
                quantized.append(Prepared(f"{p.name}-int8", p.shape, INT8, path=path))
            out.append(quantized)
        return out

    def quantize_blocks(self, fp32: Prepared, members: Sequence[str], calibration: Sequence[np.ndarray],
                        fp32_members: Sequence[str] = ()) -> Prepared:
        """A whole model (exported fp32) with only the nodes of the modules ``members`` (and
        everything under them) in int8, and the nodes between two of them (``int8_nodes``; the
        modules of the blocks kept in fp32 are ``fp32_members``): the mixed-precision student."""
        assert fp32.path is not None
        path = self._path(f"{fp32.name}-mixed")
        quantize_int8(fp32.path, path, calibration, self.calibration,
                      nodes=int8_nodes(fp32.path, members, fp32_members))
        return Prepared(f"{fp32.name}-mixed", fp32.shape, INT8, path=path)

    def layouts(self, whole: Prepared, batches: Sequence[int]) -> dict[int, str]:
        return {b: ORT_LAYOUT for b in batches}

    def session(self, item: Prepared) -> Any:
        from hpc_bkd.deploy.formats import ort_session

        if item.path is None:
            raise ValueError(f"{item.name} has no ONNX file to run")
        if item.path not in self._sessions:
            self._sessions[item.path] = ort_session(item.path, self.threads)
        return self._sessions[item.path]

    def latency_table(self, items: Sequence[Prepared], layouts: dict[int, str]) -> list[dict[str, float]]:
        """As ``deploy.latency_table``, in ONNX Runtime: every item in interleaved rounds, keeping
        its fastest call (``interleaved``)."""
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

    def conversions(self, items: Sequence[Prepared], batches: Sequence[int]) -> list[dict[str, float]]:
        """The share of its work that each item, run alone, spends converting its input and output
        at its edges (``CONVERSIONS``, from ONNX Runtime's own per-node profile): an fp32 graph
        reorders NCHW to the blocked layout its convolutions run in and back; an int8 one
        quantizes, transposes to NHWC, and back. Inside a whole model a block between two blocks of
        its own precision does neither (fp32 stays blocked, int8 stays int8 NHWC from one block to
        the next), so the selection counts each option without them (see ``choose``). A share and
        not milliseconds: a profiled call is slower than a timed one, and on a loaded machine by a
        varying amount, but both parts of one profiled call are slowed alike."""
        import json

        from hpc_bkd.deploy.formats import INPUT_NAME

        out = []
        for p in items:
            if p.path is None:
                raise ValueError(f"{p.name} has no ONNX file to run")
            opts = _session_options(self.threads)
            opts.enable_profiling = True
            opts.profile_file_prefix = str(self.workdir / f"profile-{p.path.stem}")
            import onnxruntime as ort

            sess = ort.InferenceSession(str(p.path), opts, providers=["CPUExecutionProvider"])
            runs: dict[str, int] = {}
            for b in batches:
                x = random_input(p.shape, b).numpy()
                runs[str(b)] = 10 if b == 1 else 3
                for _ in range(2 + runs[str(b)]):
                    sess.run(None, {INPUT_NAME: x})
            profile = Path(sess.end_profiling())
            events = json.loads(profile.read_text())
            profile.unlink(missing_ok=True)
            out.append(_conversion_share(events, [(str(b), 2, runs[str(b)]) for b in batches]))
        return out

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


CONVERSIONS = frozenset({"ReorderInput", "ReorderOutput", "Transpose", "QuantizeLinear", "DequantizeLinear"})


def _session_options(threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def _conversion_share(events: Sequence[dict[str, Any]], calls: Sequence[tuple[str, int, int]]) -> dict[str, float]:
    """From an ONNX Runtime profile of ``calls`` (per batch key: warm-up calls, then timed calls,
    in that order), the median over the timed calls of the share of the call's summed kernel time
    spent in layout and precision conversion nodes (``CONVERSIONS``), under the batch key; under
    ``in@<key>`` the share of those run before the first other node (the input edge's)."""
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = sorted((e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    conv, first, total = [0.0] * len(runs), [0.0] * len(runs), [0.0] * len(runs)
    started = [False] * len(runs)
    for e in nodes:
        k = next((i for i, r in enumerate(runs) if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]), None)
        if k is None:
            continue
        total[k] += e["dur"]
        if e.get("args", {}).get("op_name") in CONVERSIONS:
            conv[k] += e["dur"]
            first[k] += 0.0 if started[k] else e["dur"]
        else:
            started[k] = True
    out, start = {}, 0
    for key, warm, timed in calls:
        span = range(start + warm, start + warm + timed)
        out[key] = statistics.median([conv[i] / total[i] for i in span if total[i] > 0] or [0.0])
        out[f"in@{key}"] = statistics.median([first[i] / total[i] for i in span if total[i] > 0] or [0.0])
        start += warm + timed
    return out


class _Bundle(nn.Module):
    """Many options as one module: input i feeds the options ``which`` maps to it; one output each."""

    def __init__(self, parts: Sequence[nn.Module], which: Sequence[int]) -> None:
        super().__init__()
        self.parts, self.which = nn.ModuleList(parts), list(which)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(xs[i]) for m, i in zip(self.parts, self.which))


def _export_bundle(bundle: _Bundle, shapes: Sequence[Sequence[int]], path: Path, inputs: Sequence[str],
                   outputs: Sequence[str]) -> None:
    """``bundle`` to ONNX as ``export.export_onnx`` writes one model: torch's exporter, every
    input's batch dimension dynamic (one shared dimension), the file checked."""
    import onnx

    gen = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(2, *s, generator=gen) for s in shapes)  # batch 2: not specialised
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        torch.onnx.export(bundle, example, str(path), input_names=list(inputs), output_names=list(outputs),
                          dynamic_shapes=(tuple({0: batch} for _ in shapes),), dynamo=True, verbose=False)
    onnx.checker.check_model(str(path))


def _save_part(extractor: Any, source_input: str, source_output: str, path: Path) -> None:
    """The subgraph from ``source_input`` to ``source_output`` as a model of its own, whose input
    and output carry the names every exported option has (``export.INPUT_NAME``, ``OUTPUT_NAME``)."""
    import onnx

    from hpc_bkd.deploy.formats import INPUT_NAME, OUTPUT_NAME

    model = extractor.extract_model([source_input], [source_output])
    rename = {source_input: INPUT_NAME, source_output: OUTPUT_NAME}
    g = model.graph
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
        for k, name in enumerate(node.output):
            if name in rename:
                node.output[k] = rename[name]
    for value in [*g.input, *g.output, *g.value_info]:
        value.name = rename.get(value.name, value.name)
    onnx.save(model, str(path))


def interleaved(runs: Sequence[dict[int, Callable[[], object]]], batches: Sequence[int],
                rounds: int = 3) -> list[dict[str, float]]:
    """Milliseconds per call of each item's run at each batch: ``rounds`` interleaved rounds (every
    item once per round, so a burst of load falls on one round of every item alike), and of all
    the timed calls of all rounds the fastest. Another job sharing the CPU only ever adds time to
    a call, so on a loaded machine the fastest call is the one nearest the machine's own speed
    (a round's median, the rule of ``deploy.latency_table``, stays inflated when the load lasts
    longer than a round: parts then outweigh their whole by as much as the load varies)."""
    cpu = torch.device("cpu")
    best: list[dict[str, float]] = [{str(b): float("inf") for b in batches} for _ in runs]
    for _ in range(rounds):
        for row, per_batch in zip(best, runs):
            for b in batches:
                n, warm = (15, 3) if b == 1 else (4, 1)
                row[str(b)] = min(row[str(b)], min(forward_times(per_batch[b], n, warm, cpu)))
    return best


_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def quantize_int8(source: Path, target: Path, calibration: Sequence[np.ndarray] | Sequence[dict[str, np.ndarray]],
                  method: str = "minmax", nodes: Sequence[str] | None = None) -> None:
    """ONNX Runtime static quantization of ``source`` into ``target``: QDQ format, int8 weights per
    output channel, int8 activations whose ranges come from ``calibration`` (input batches, or
    per step a batch per input name for a model of several inputs) by ``method``. ``nodes``:
    quantize only these nodes (None: every quantizable one)."""
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


def _quantize(source: Path, target: Path, calibration: Sequence[np.ndarray] | Sequence[dict[str, np.ndarray]],
              method: str, nodes: Sequence[str] | None) -> None:
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


def int8_nodes(path: Path, members: Sequence[str], fp32_members: Sequence[str] = ()) -> list[str]:
    """The nodes to quantize for the blocks ``members`` in int8 (``module_nodes``), plus the nodes
    outside every block (``fp32_members``: the modules of the blocks kept in fp32) that only pass
    values from int8 blocks to int8 blocks: the ReLU or pooling between two blocks. Left in fp32,
    each would cost a dequantize and a requantize of the whole activation between two int8 blocks
    (14 % of the default job's student at batch 64), which quantizing the whole teacher does not
    pay; quantized, ONNX Runtime keeps the chain in int8 from one block to the next."""
    import onnx

    nodes = module_nodes(path, members)
    graph = onnx.load(str(path), load_external_data=False).graph
    fixed = set(module_nodes(path, fp32_members)) if fp32_members else set()
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    outputs = {o.name for o in graph.output}
    int8 = set(nodes)
    glue = [n for n in graph.node if n.name and n.name not in int8 and n.name not in fixed and n.op_type != "Constant"]

    def dynamic(n: Any) -> list[str]:  # inputs computed by the graph (not weights, not constants)
        return [i for i in n.input if i in producer and producer[i].op_type != "Constant"]

    fed: set[str] = set()  # every computed input comes from int8 nodes (or such glue)
    for n in glue:  # the exporter writes nodes in topological order
        if dynamic(n) and all(producer[i].name in int8 | fed for i in dynamic(n)):
            fed.add(n.name)
    feeding: set[str] = set()  # every consumer is an int8 node (or such glue)
    for n in reversed(glue):
        used = [c for o in n.output for c in consumers.get(o, [])]
        if used and not outputs & set(n.output) and all(c in int8 | feeding for c in used):
            feeding.add(n.name)
    return nodes + [n.name for n in glue if n.name in fed and n.name in feeding]


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


__all__ = ["FP32", "INT8", "ORT_LAYOUT", "Prepared", "module_nodes", "int8_nodes", "image_batches", "SelectionRuntime", "TorchRuntime", "OnnxRuntime", "OrtModule",
           "quantize_int8", "make_runtime", "interleaved", "cpu_threads"]
