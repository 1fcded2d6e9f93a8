"""Candidate students per block and the budgeted choice among them (#14): names, modules and seeds;
a job that trains several candidates, chooses exactly under a budget, reports the front, refuses a
budget nothing meets (naming the tightest one) without retraining, and trains only what a new
candidate adds; a 2-rank job trains the same units as one rank."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import hpc

from hpc_bkd.blocks.candidates import Candidate, CandidateError, job_units, parse_candidates, unit_seed
from hpc_bkd.blocks.models import build_model
from hpc_bkd.blocks.students import build_candidate
from hpc_bkd.blocks.surgery import find_blocks
from hpc_bkd.config import ConfigError, load_config
from hpc_bkd.deploy.export import load_run
from hpc_bkd.distributed import runtime
from hpc_bkd.job import stages as pipeline
from hpc_bkd.selection.options import BudgetError, MeasuredOptions, choose_within_budget
from hpc_bkd.store import atomic_io
from hpc_bkd.store.records import JobRecord, OptionRecord

TWO = "blocks.candidates=separable-d1,lowrank-r0.25"


def test_candidate_names_are_canonical_and_bad_ones_name_the_valid_kinds():
    names = [c.name for c in parse_candidates(["separable", "separable-d1", "separable-w0.5-d2", "lowrank",
                                               "lowrank-r0.5", "separable-d2"])]
    assert names == ["separable-d2", "separable-d1", "separable-d2-w0.5", "lowrank-r0.25", "lowrank-r0.5"]
    with pytest.raises(CandidateError, match="valid kinds: separable .*lowrank"):
        Candidate.parse("mobilenet-d1")
    with pytest.raises(CandidateError, match="lowrank takes r"):
        Candidate.parse("lowrank-d2")
    with pytest.raises(CandidateError, match="must be > 0"):
        Candidate.parse("separable-d0")
    with pytest.raises(ConfigError, match="blocks.candidates: unknown candidate kind 'nope'"):
        load_config("tiny", ["blocks.candidates=nope", "select.method=budget"])
    with pytest.raises(ConfigError, match="tolerance .* takes one candidate"):
        load_config("tiny", [TWO])
    with pytest.raises(ConfigError, match="always an option"):
        load_config("tiny", ["blocks.candidates=teacher,lowrank", "select.method=budget"])


@pytest.mark.parametrize("arch", ["vgg11", "resnet18"])
def test_every_kind_fits_every_block_and_is_seeded_by_block_and_candidate(arch: str):
    model = build_model(arch, 10, 0.125).eval()
    blocks = find_blocks(model, (3, 32, 32))
    cands = parse_candidates(["separable-d1", "separable-d2-w0.5", "lowrank-r0.25"])
    for spec in blocks:
        for c in cands:  # build_candidate checks the output shape (stride-2 blocks included)
            build_candidate(spec, c, seed=3)
    a, b = build_candidate(blocks[1], cands[2], 3), build_candidate(blocks[1], cands[2], 3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert len({unit_seed(3, 1, c.name) for c in cands}) == 3 and unit_seed(3, 1, "x") != unit_seed(3, 2, "x")
    units = job_units(len(blocks), cands)
    assert [u.id for u in units] == list(range(len(units))) and units[4].key == f"001-{cands[1].name}"


def _options(lat: list[list[float]], kl: list[list[float]]) -> MeasuredOptions:
    rows = [[OptionRecord(b, "teacher" if j == 0 else f"c{j}", None if j == 0 else 10 * b + j, k, None,
                          {"1": t}, 10, 100, False) for j, (t, k) in enumerate(zip(ts, ks))]
            for b, (ts, ks) in enumerate(zip(lat, kl))]
    teacher = {"kl": 0.0, "latency_ms@1": sum(r[0] for r in lat) + 1.0, "params": 30.0, "macs": 300.0}
    return MeasuredOptions(rows, teacher, {"kl": 0.0, "latency_ms@1": 1.0, "params": 0.0, "macs": 0.0},
                           {"1": "contiguous"})


def test_select_is_exact_and_names_the_tightest_budget():
    # teacher blocks 2 + 2 + 1 ms, rest 1 ms: 6 ms; candidates trade KL for latency
    m = _options([[2.0, 1.0, 0.5], [2.0, 1.5], [1.0, 0.2]], [[0.0, 0.1, 0.4], [0.0, 0.05], [0.0, 0.3]])
    s = load_config("tiny", ["select.method=budget", "select.latency_batches=1", "select.budget=0.75"]).select
    chosen = choose_within_budget(s, m)  # 4.5 ms allowed: dropping 1.5 ms at least KL: c1 on block 0 and 1 (0.15) vs ...
    assert chosen.predicted["latency_ms@1"] <= 4.5 + 1e-9 and chosen.optimal
    assert chosen.chosen == ["c1", "c1", "teacher"] and chosen.predicted["kl"] == pytest.approx(0.15)
    assert chosen.front[0].fraction == pytest.approx((1 + 0.5 + 1.5 + 0.2) / 6)
    assert chosen.front[-1].totals["kl"] == 0.0
    s = load_config("tiny", ["select.method=budget", "select.latency_batches=1", "select.budget=0.5"]).select
    with pytest.raises(BudgetError, match=r"tightest feasible budget is 0\.533"):
        choose_within_budget(s, m)
    s = load_config("tiny", ["select.method=budget", "select.latency_batches=1", "select.objective=cost",
                             "select.budget_unit=absolute", "select.budget=0.35"]).select
    fastest = choose_within_budget(s, m)  # least latency with summed KL <= 0.35: 4.5 ms at KL 0.15 beats 4.7 ms at 0.35
    assert fastest.chosen == ["c1", "c1", "teacher"] and fastest.predicted["latency_ms@1"] == pytest.approx(4.5)
    with pytest.raises(ConfigError, match="budget_unit"):
        load_config("tiny", ["select.method=budget", "select.objective=cost"])


def test_int8_runs_to_the_end_and_its_one_switch_is_paid():
    """With int8 options the choice is fp32 up to some block and int8 from there on, its precision
    switch costed in the prediction; a switch that was not offered (pooling between two blocks:
    ``None``) is never made, and an alternating choice the sum alone would prefer is not taken."""
    from dataclasses import replace

    def row(b: int, t32: float, t8: float, kl8: float) -> list[OptionRecord]:
        return [OptionRecord(b, "teacher", None, 0.0, None, {"1": t32}, 10, 100, False),
                OptionRecord(b, "teacher", None, kl8, None, {"1": t8}, 10, 100, False, "int8")]

    # block 1 is cheap in fp32 alone; the sum would take int8, fp32, int8 (2.0 + 0.5 + 1.0 + rest 1)
    rows = [row(0, 3.0, 2.0, 0.01), row(1, 0.5, 1.0, 0.01), row(2, 3.0, 1.0, 0.01)]
    teacher = {"kl": 0.0, "latency_ms@1": 7.5, "params": 30.0, "macs": 300.0}
    m = MeasuredOptions(rows, teacher, {"kl": 0.0, "latency_ms@1": 1.0, "params": 0.0, "macs": 0.0},
                        {"1": "contiguous"}, "onnxruntime", ("fp32", "int8"), [{"1": 0.2}, {"1": 0.3}])
    s = load_config("tiny", ["select.method=budget", "select.latency_batches=1", "select.objective=cost",
                             "select.budget_unit=absolute", "select.budget=1.0"]).select
    chosen = choose_within_budget(s, m)
    labels = [o.label for o in chosen.options if o.chosen]
    assert labels == ["teacher-int8", "teacher-int8", "teacher-int8"]  # 2 + 1 + 1 + 1 = 5.0 ms, no switch
    assert chosen.predicted["latency_ms@1"] == pytest.approx(5.0)
    # int8 block 0 made dear: fp32 up to block 1, then int8, paying the 0.3 ms switch before block 2
    rows[0][1] = replace(rows[0][1], latency_ms={"1": 9.0})
    chosen = choose_within_budget(s, replace(m, options=rows))
    assert [o.label for o in chosen.options if o.chosen] == ["teacher", "teacher", "teacher-int8"]
    assert chosen.predicted["latency_ms@1"] == pytest.approx(3.0 + 0.5 + 1.0 + 1.0 + 0.3)
    # that switch not offered: the best left is int8 from block 1 on (switch 0.2 ms)
    chosen = choose_within_budget(s, replace(m, options=rows, switches=[{"1": 0.2}, None]))
    assert [o.label for o in chosen.options if o.chosen] == ["teacher", "teacher-int8", "teacher-int8"]
    assert chosen.predicted["latency_ms@1"] == pytest.approx(3.0 + 1.0 + 1.0 + 1.0 + 0.2)


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "blocks").glob("block-*.pt"))}


def test_a_budgeted_job_chooses_reports_and_resumes_without_retraining(tmp_path: Path, tiny_teacher: Path):
    rt = runtime.init_runtime("cpu", 1)
    base = ["select.method=budget", f"teacher.checkpoint={tiny_teacher}", "run.threads=1", "finetune.epochs=0",
            f"run.dir={tmp_path / 'run'}", "plan.cost_model=macs", "select.budget=1.0"]
    record = pipeline.run_job(load_config("tiny", [TWO, *base]), rt)
    assert record is not None and record.selection is not None
    s = record.selection
    assert len(record.blocks) == 16 and {b.candidate for b in record.blocks} == {"separable-d1", "lowrank-r0.25"}
    assert all(b.swapped_val_kl is not None and b.swapped_val_kl >= 0 for b in record.blocks)
    assert len(s.chosen) == 8 and all(s.predicted[k] <= s.limits[k] * (1 + 1e-9) for k in s.limits)
    assert {"latency_ms@1", "latency_ms@64", "kl_assembled", "kl_recalibrated", "kl_finetuned"} <= set(s.measured)
    assert [b.index for b in record.blocks if b.accepted] == record.accepted_blocks
    assert (tmp_path / "run" / "pareto.png").is_file() and "selection: minimise summed KL" in \
        (tmp_path / "run" / "summary.txt").read_text()
    assert JobRecord.load(tmp_path / "run" / "report.json") == record
    saved = load_run(tmp_path / "run")  # the student file names its chosen candidates
    assert saved.students == {str(o.block): o.name for o in s.options if o.chosen and o.unit is not None}
    trained = _files(tmp_path / "run")
    with pytest.raises(BudgetError, match="tightest feasible budget is .*every trained unit is saved"):
        pipeline.run_job(load_config("tiny", [TWO, *base, "select.budget=0.01"]), rt)
    assert _files(tmp_path / "run") == trained  # nothing retrained, nothing rewritten
    again = pipeline.run_job(load_config("tiny", ["blocks.candidates=separable-d1,lowrank-r0.25,separable-d2",
                                                  *base]), rt)
    assert again is not None and len(again.blocks) == 24
    assert sum(b.resumed_finished for b in again.blocks) == 16  # a new candidate trains only its own units
    assert {n: b for n, b in _files(tmp_path / "run").items() if n in trained} == trained


@pytest.mark.mpi
def test_two_ranks_train_the_same_candidates_as_one(tmp_path: Path, tiny_teacher: Path):
    common = ["-c", "tiny", "--set", f"teacher.checkpoint={tiny_teacher}", "--set", "run.threads=1",
              "--set", TWO, "--set", "select.method=budget", "--set", "select.budget=1.0",
              "--set", "finetune.epochs=0", "--set", "plan.cost_model=macs"]
    hpc("distill", *common, "--run-dir", str(tmp_path / "np1"))
    hpc("distill", *common, "--run-dir", str(tmp_path / "np2"), np=2)
    report = json.loads((tmp_path / "np2" / "report.json").read_text())
    assert {b["rank"] for b in report["blocks"]} == {0, 1}  # the units were split between the ranks
    one, two = _files(tmp_path / "np1"), _files(tmp_path / "np2")
    assert one.keys() == two.keys() and len(one) == 16
    for name in one:
        a, b = (atomic_io.load(r / "blocks" / name)["state_dict"] for r in (tmp_path / "np1", tmp_path / "np2"))
        assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5) for k in a), name
    # a budget no choice meets fails on rank 0 after the ranks have gathered: rank 1 must not wait
    proc = hpc("distill", *common, "--set", "select.budget=0.01", "--run-dir", str(tmp_path / "np2"), np=2,
               check=False, timeout=300)
    assert proc.returncode == 2 and "tightest feasible budget" in proc.stderr, proc.stderr[-3000:]
    assert "[rank 1/2] error: rank 0 failed: select.budget 0.01" in proc.stderr


def test_selection_runtime_and_int8_are_checked_before_any_work(monkeypatch):
    """int8 needs ONNX Runtime; asking for it (or for ONNX Runtime timing) without the export
    extra, or with PyTorch timing, is a config error naming the cause, before the job starts."""
    import importlib.util

    with pytest.raises(ConfigError, match="int8 needs select.runtime onnxruntime"):
        load_config("tiny", ["select.method=budget", "select.runtime=torch", "select.precisions=[fp32,int8]"])
    with pytest.raises(ConfigError, match="select.precisions: fp32 and optionally int8"):
        load_config("tiny", ["select.precisions=[int4]"])
    cfg = load_config("tiny", ["select.method=budget", "select.runtime=auto", "select.precisions=[fp32,int8]"])
    with pytest.raises(ConfigError, match="runs on cuda"):
        pipeline.check_selection_runtime(cfg, torch.device("cuda"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ConfigError, match=r"onnxruntime, not installed: install the export extra"):
        pipeline.check_selection_runtime(cfg, torch.device("cpu"))
    pipeline.check_selection_runtime(load_config("tiny", ["select.method=budget"]), torch.device("cpu"))  # torch: fine
