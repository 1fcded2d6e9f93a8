"""The selection in the runtime the student ships to (#23): options timed in ONNX Runtime, int8
options (static QDQ quantization) with their own measured latency and quality score, and the
mixed-precision student.onnx, loaded where hpc_bkd cannot be imported."""
import copy
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hpc_bkd.deploy.formats import missing_extra
from hpc_bkd.store import atomic_io

WHY = missing_extra("onnx")
if WHY:
    pytest.skip(f"ONNX Runtime timing and int8 need the export extra: {WHY}", allow_module_level=True)

import onnx  # noqa: E402  (only with the extra)
from conftest import WITHOUT_HPC_BKD, hpc  # noqa: E402

from hpc_bkd.blocks.surgery import swapped  # noqa: E402
from hpc_bkd.deploy.export import export_run, load_eval_split, load_run  # noqa: E402
from hpc_bkd.deploy.form import TimingPlan, teacher_block  # noqa: E402
from hpc_bkd.deploy.runtimes import INT8, OnnxRuntime, OrtModule  # noqa: E402
from hpc_bkd.selection.options import TrainedUnits, block_inputs, int8_scores, kl_to_teacher  # noqa: E402
from hpc_bkd.store.records import JobRecord  # noqa: E402
from hpc_bkd.store.rundir import RunDir  # noqa: E402

QUICK = TimingPlan(batch_size=32, runs=20, warmup=2, throughput_runs=2, throughput_warmup=1, probe_runs=2, threads=1)

# a fresh interpreter in isolated mode with hpc_bkd blocked (conftest.WITHOUT_HPC_BKD)
STANDALONE = WITHOUT_HPC_BKD + textwrap.dedent("""
    import json
    import onnxruntime as ort
    import torch

    export_dir, data = sys.argv[1], torch.load(sys.argv[2])
    session = ort.InferenceSession(f"{export_dir}/student.onnx", providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: data["inputs"].numpy()})[0]
    correct = int((torch.from_numpy(logits).argmax(1) == data["labels"]).sum())
    print(json.dumps({"accuracy": 100.0 * correct / len(data["labels"])}))
""")


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, tiny_teacher: Path) -> Path:
    """A tiny budgeted job whose options are timed in ONNX Runtime in fp32 and int8."""
    run = tmp_path_factory.mktemp("int8") / "run"
    hpc("run", "-c", "tiny", "--run-dir", str(run), "--set", f"teacher.checkpoint={tiny_teacher}",
        "--set", "run.threads=1", "--set", "select.method=budget", "--set", "select.budget=1.0",
        "--set", "select.runtime=onnxruntime", "--set", "select.precisions=[fp32,int8]",
        "--set", "select.calibration_images=64", "--set", "finetune.epochs=0", "--set", "plan.cost_model=macs")
    return run


@pytest.mark.slow  # a tiny job (distill, every option exported, quantized and timed): ~40-60 s
def test_options_are_timed_in_onnxruntime_in_both_precisions(int8_run: Path):
    s = JobRecord.load(int8_run / "report.json").selection
    assert s is not None and s.runtime == "onnxruntime" and s.precisions == ["fp32", "int8"]
    assert set(s.layouts) == {"1", "64"}
    by_block: dict[int, list] = {}
    for o in s.options:
        by_block.setdefault(o.block, []).append(o)
    for block, options in by_block.items():
        labels = [o.label for o in options]
        assert labels == ["teacher", "separable-d1", "teacher-int8", "separable-d1-int8"], (block, labels)
        for o in options:  # every option has its own measured latency at every batch size
            assert set(o.latency_ms) == {"1", "64"} and all(0 < v < 1e3 for v in o.latency_ms.values()), o
        t32, c32, t8, c8 = options
        assert t8.unit is None and c8.unit == c32.unit and t8.params == t32.params
        # int8 scores are measured, not copied: the int8 teacher block is not free, and the
        # candidate's int8 score differs from its fp32 one
        assert t8.kl > 0 and t8.swapped_val_acc is not None and c8.kl != c32.kl
        assert sum(o.chosen for o in options) == 1
    assert s.front and s.front_fp32 and s.front[0].fraction <= s.front_fp32[0].fraction + 1e-9
    # the assembled student and both baselines were timed in the same runtime
    assert {"latency_ms@1", "teacher_latency_ms@64", "teacher_int8_latency_ms@1"} <= set(s.measured)
    summary = (int8_run / "summary.txt").read_text()
    assert "timed in onnxruntime, precisions fp32/int8" in summary and "front without int8" in summary


@pytest.mark.slow
def test_an_int8_score_is_the_teacher_with_that_block_quantized(int8_run: Path, tmp_path: Path):
    """The shared-prefix score of an int8 block equals the plain KL of the teacher with that
    block swapped for its ONNX Runtime session, and quantization costs some but little."""
    run = load_run(int8_run)
    data = load_eval_split(run.config).data
    reference, cpu = copy.deepcopy(run.teacher), torch.device("cpu")
    spec = run.blocks[2]
    units = TrainedUnits(run.teacher, run.blocks, [], {}, 0.0, run.input_shape, 0, cpu, 1, data, 64)
    rt = OnnxRuntime(1, tmp_path)
    fp32 = rt.prepare(teacher_block(run.teacher, spec), spec.in_shape, "block")
    calibration = block_inputs(units, 64)[spec.index]  # the teacher prefix on training images
    assert sum(len(b) for b in calibration) == 64 and calibration[0].shape[1:] == tuple(spec.in_shape)
    int8 = rt.quantize(fp32, calibration)
    assert int8.precision == INT8 and any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8.path)).graph.node)
    (acc, kl), = int8_scores(units, rt, [(spec.index, int8)]).values()
    with swapped(run.teacher, spec, OrtModule(rt.session(int8), "input")) as model:
        direct = kl_to_teacher(model, reference, data, "val", 64, cpu)
    assert kl == pytest.approx(direct, rel=1e-4, abs=1e-6) and 0 < kl < 0.5 and 0 <= acc <= 100
    with swapped(run.teacher, spec, OrtModule(rt.session(fp32), "input")) as model:  # fp32 in ORT: ~exact
        assert kl_to_teacher(model, reference, data, "val", 64, cpu) < 1e-6


@pytest.mark.slow
def test_mixed_precision_export_loads_without_hpc_bkd(int8_run: Path, tmp_path: Path):
    """A student whose choice took one kept block and one replaced block in int8: student.onnx holds
    QDQ nodes for exactly those blocks, runs where hpc_bkd cannot be imported with the test accuracy
    model.json states; the .pt2 stays fp32."""
    copy = tmp_path / "run"
    shutil.copytree(int8_run, copy, ignore=shutil.ignore_patterns(RunDir(int8_run).export_dir.name))
    saved = atomic_io.load(RunDir(copy).student)
    kept = next(i for i in range(8) if str(i) not in saved["students"])
    replaced = next(iter(saved["students"]), None)
    int8_blocks = {str(kept): "int8", **({replaced: "int8"} if replaced is not None else {})}
    atomic_io.save({**saved, "precisions": int8_blocks}, RunDir(copy).student)
    result = export_run(copy, ("onnx",), plan=QUICK)
    card = json.loads(Path(result.model_json).read_text())
    per_block = {b["block"]: b for b in card["model"]["per_block"]}
    assert {i for i, b in per_block.items() if b["precision"] == "int8"} == {int(i) for i in int8_blocks}
    assert card["precision"] == {"student.onnx": "mixed int8/fp32 (QDQ)", "student.pt2": "fp32"}
    run = load_run(copy)
    members = {m for i in int8_blocks for m in run.blocks[int(i)].members}
    graph = onnx.load(str(Path(result.export_dir) / "student.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    quantized = [n for n in convs if producers.get(n.input[1]) is not None
                 and producers[n.input[1]].op_type == "DequantizeLinear"]
    scopes = {n.name: next(p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes")
              for n in convs}
    assert quantized and len(quantized) < len(convs)  # mixed: some convolutions int8, the rest fp32
    assert all(any(f"'{m}" in scopes[n.name] for m in members) for n in quantized)
    baseline = card["int8_teacher_baseline"]
    assert 0 <= baseline["test_accuracy"] <= 100 and baseline["teacher_int8"]["runtime"] == "onnxruntime"
    split = load_eval_split(run.config)
    xs, ys = zip(*split.batches())
    torch.save({"inputs": torch.cat(xs), "labels": torch.cat(ys)}, tmp_path / "test-split.pt")
    proc = subprocess.run([sys.executable, "-I", "-c", STANDALONE, result.export_dir, str(tmp_path / "test-split.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    standalone = json.loads(proc.stdout.strip().splitlines()[-1])
    assert standalone["accuracy"] == pytest.approx(card["test_accuracy"]["student.onnx"])
    assert card["test_accuracy"]["student.onnx"] > 0.5 * card["test_accuracy"]["student"]


def _conv(channels: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU()).eval()


def test_options_exported_and_quantized_together_are_each_option_alone(tmp_path: Path):
    """One export and one calibration for every option (``prepare_rows``/``quantize_rows``) give,
    per option, a file of its own that computes that option, fp32 exactly and int8 as close to the
    option as a calibration of it alone; each block's calibration reaches its own options only."""
    import numpy as np

    from hpc_bkd.deploy.runtimes import FP32

    rt = OnnxRuntime(1, tmp_path)
    rows = [((4, 8, 8), [(_conv(4, 0), "a0"), (_conv(4, 1), "a1")]), ((4, 8, 8), [(_conv(4, 2), "b0")])]
    fp32 = rt.prepare_rows(rows)
    assert [[p.name for p in row] for row in fp32] == [["a0", "a1"], ["b0"]]
    x = torch.randn(3, 4, 8, 8)
    for row, (_, options) in zip(fp32, rows):
        for p, (module, _) in zip(row, options):
            assert p.precision == FP32 and p.source is not None
            got = torch.from_numpy(rt.session(p).run(None, {"input": x.numpy()})[0])
            assert torch.allclose(got, module(x), atol=1e-5)
    # block b sees inputs 10x larger than block a: its ranges, not a's, must be calibrated
    calibration = [[np.random.RandomState(k).randn(8, 4, 8, 8).astype(np.float32) * scale for k in range(2)]
                   for scale in (1.0, 10.0)]
    int8 = rt.quantize_rows(fp32, calibration)
    alone = rt.quantize(fp32[1][0], calibration[1])
    big = calibration[1][0]
    together = rt.session(int8[1][0]).run(None, {"input": big})[0]
    assert [p.name for p in int8[0]] == ["a0-int8", "a1-int8"] and all(p.precision == INT8 for p in int8[0])
    assert np.allclose(together, rt.session(alone).run(None, {"input": big})[0], atol=1e-5)
    reference = rows[1][1][0][0](torch.from_numpy(big)).detach().numpy()
    assert 0 < np.abs(together - reference).max() < 0.05 * np.abs(reference).max()


def test_glue_between_two_int8_blocks_is_quantized_and_nothing_else(tmp_path: Path):
    """``int8_nodes``: the ReLU and pooling between two int8 blocks join them; the nodes after the
    last int8 block (feeding an fp32 head) and an fp32 block's own nodes do not."""
    from onnx import TensorProto, helper

    from hpc_bkd.deploy.runtimes import int8_nodes

    def node(op: str, inputs: list[str], output: str, scope: str) -> onnx.NodeProto:
        n = helper.make_node(op, inputs, [output], name=output)
        n.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr([scope]))
        return n

    chain = [("Conv", "c0", "b0"), ("Relu", "r0", "act0"), ("MaxPool", "p0", "pool0"), ("Conv", "c1", "b1"),
             ("Relu", "r1", "act1"), ("Conv", "c2", "b2"), ("Relu", "r2", "act2"), ("Conv", "c3", "b3"),
             ("Relu", "r3", "act3"), ("Flatten", "f", "flat")]
    nodes, previous = [], "input"
    for op, out, scope in chain:
        nodes.append(node(op, [previous, "w"] if op == "Conv" else [previous], out, scope))
        previous = out
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("f", TensorProto.FLOAT, None)],
                              [helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])])
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph), str(path))
    # blocks 0, 1 and 3 int8, block 2 fp32: glue only between 0 and 1
    assert sorted(int8_nodes(path, ["b0", "b1", "b3"], ["b2"])) == ["c0", "c1", "c3", "p0", "r0"]
