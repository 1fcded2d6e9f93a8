"""The job's stages in-process on a one-rank runtime (an MPI singleton): what each returns, the
distiller's save/resume through a BlockStore, fine-tuning, and the report's round trip."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpc_bkd.blocks.candidates import Candidate, job_units
from hpc_bkd.config import job_candidates, load_config
from hpc_bkd.distill.distiller import BlockResult, LocalDistiller
from hpc_bkd.distill.finetune import finetune
from hpc_bkd.distributed import runtime
from hpc_bkd.job import stages as pipeline
from hpc_bkd.job.report import summary_text
from hpc_bkd.planning.planner import BlockCost, Plan
from hpc_bkd.planning.schedule import SequentialSchedule, schedule_for
from hpc_bkd.store.records import FinetuneEpoch, JobRecord
from hpc_bkd.store.rundir import BlockStore, RunDir, RunDirConflict


@pytest.fixture(scope="module")
def rt() -> runtime.Runtime:
    return runtime.init_runtime("cpu", 1)


def _cfg(tmp_path: Path, tiny_teacher: Path, *extra: str):
    return load_config("tiny", [f"teacher.checkpoint={tiny_teacher}", "run.threads=1", f"run.dir={tmp_path / 'run'}",
                                "plan.cost_model=macs", *extra])


def _through_plan(cfg, rt):
    clock = pipeline.Clock()
    run_dir = pipeline.open_run_dir(cfg, rt)
    data = pipeline.load_job_data(cfg, rt, clock)
    teacher = pipeline.share_teacher(cfg, rt, data, run_dir, clock)
    choice = pipeline.agree_schedule(cfg, rt, teacher, data)
    units = job_units(len(teacher.blocks), job_candidates(cfg))
    resume = pipeline.find_finished(cfg, rt, run_dir, teacher, units)
    costs = pipeline.measure_costs(cfg, rt, teacher, units, data, choice, resume, run_dir)
    plan = pipeline.share_plan(cfg, rt, units, costs, resume, clock)
    return clock, run_dir, data, teacher, units, choice, resume, costs, plan


def test_stages_in_order_give_a_job_record(tmp_path: Path, tiny_teacher: Path, rt):
    cfg = _cfg(tmp_path, tiny_teacher)
    clock, run_dir, data, teacher, units, choice, resume, costs, plan = _through_plan(cfg, rt)
    assert run_dir.config.is_file() and json.loads(run_dir.config.read_text())["model"]["arch"] == "vgg11"
    assert len(teacher.blocks) == 8 and not teacher.model.training and len(teacher.fingerprint) == 16
    assert choice.cache.use and choice.schedule.uses_cache  # tiny data fits: the cached schedule
    assert [(u.block, u.candidate) for u in units] == [(i, "separable-d1") for i in range(8)]
    assert resume.finished == [] and resume.remaining(units) == units
    assert costs is not None and costs.cost_model == "macs" and len(costs.costs) == 8
    assert json.loads(run_dir.costs.read_text())["units"] == [u.key for u in units]
    assert plan.assignment == [list(range(8))] and plan.costs == costs.costs
    outcome = pipeline.distill_owned(cfg, rt, teacher, units, data, run_dir, plan, choice, resume, "mpi")
    assert not outcome.interrupted and [r.index for r in outcome.results] == list(range(8))
    assert all(run_dir.block(u).is_file() for u in units) and outcome.cache is not None
    outcomes = pipeline.gather_outcomes(rt, outcome, clock)
    pipeline.stop_if_interrupted(rt, outcomes, run_dir)  # nobody was stopped: returns
    record = pipeline.report_job(cfg, rt, data, run_dir, teacher, units, choice, costs, plan, outcomes, resume,
                                 clock)
    assert record.status == "completed" and [b.index for b in record.blocks] == list(range(8))
    assert record.accuracy.teacher_test == teacher.test_acc
    assert JobRecord.load(run_dir.report) == record
    assert run_dir.student.is_file() and run_dir.summary.read_text().startswith("hpc_bkd report")


def test_a_second_run_resumes_every_block(tmp_path: Path, tiny_teacher: Path, rt):
    cfg = _cfg(tmp_path, tiny_teacher, "finetune.epochs=0")
    record = pipeline.run_job(cfg, rt)
    assert record is not None
    *_, teacher, units, choice, resume, costs, plan = _through_plan(cfg, rt)
    assert resume.finished == list(range(8)) and plan.assignment == [[]]
    assert costs is not None and costs.costs == record.plan.costs  # read back, not re-measured
    results = pipeline.collect_results([], resume, RunDir(cfg.run.dir), units)
    assert all(r.resumed_finished for r in results.values())
    assert all(torch.equal(results[u.id].state_dict[k], v)
               for u in units for k, v in RunDir(cfg.run.dir).load_block(u)["state_dict"].items())


@pytest.mark.parametrize("candidates", [[], ["blocks.candidates=separable-d1,lowrank-r0.25", "select.method=budget"]])
def test_distiller_stopped_then_resumed_trains_the_same_blocks(tmp_path: Path, tiny_teacher: Path, rt,
                                                              candidates: list[str], monkeypatch):
    """Stopped mid-unit and resumed from its checkpoints: the same weights as a straight run (with
    two candidates, units 0-2 are both candidates of block 0 and the first of block 1)."""
    cfg = _cfg(tmp_path, tiny_teacher, *candidates)
    _, run_dir, data, teacher, units, choice, *_ = _through_plan(cfg, rt)
    owned = units[:3]

    def distill(store: BlockStore) -> tuple[list[BlockResult], bool]:
        return LocalDistiller(teacher.model, teacher.blocks, owned, data, cfg, store, rt.device, choice.schedule, 0,
                              teacher.val_acc).run()

    straight, interrupted = distill(BlockStore(RunDir(tmp_path / "a"), "fp"))
    assert not interrupted and len(straight) == 3
    store = BlockStore(RunDir(tmp_path / "b"), "fp")
    step, steps = LocalDistiller._step, []

    def stop_after_four(self, group):  # a stop request (SIGTERM) in the middle of the first unit
        step(self, group)
        steps.append(1)
        if len(steps) == 4:
            runtime.request_stop()

    monkeypatch.setattr(LocalDistiller, "_step", stop_after_four)
    try:
        results, interrupted = distill(store)
    finally:
        runtime.clear_stop()
        monkeypatch.undo()
    assert interrupted and results == [] and all(store.resume(u) is not None for u in owned)
    assert store.resume(owned[0])["step"] == 4  # mid-epoch of the first unit
    resumed, interrupted = distill(store)
    assert not interrupted and all(r.resumed for r in resumed)
    for a, b in zip(straight, resumed):
        assert a.state_dict.keys() == b.state_dict.keys()
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert not any(store.run_dir.block(u, partial=True).exists() for u in owned)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise runs in this process."""


@pytest.mark.parametrize("early_stop", [False, True])
def test_unit_killed_after_its_last_checkpoint_is_finished_not_trained_again(tmp_path: Path, tiny_teacher: Path,
                                                                             rt, monkeypatch, early_stop: bool):
    """A kill between a unit's last checkpoint (its epochs done, or early-stopped) and its finished
    file: the next run writes the finished file from that checkpoint and trains no further epoch."""
    extra = ["distill.epochs=2", *(["distill.early_stop_tolerance=100"] if early_stop else [])]
    cfg = _cfg(tmp_path, tiny_teacher, *extra)
    _, _, data, teacher, units, _, *_ = _through_plan(cfg, rt)
    owned = units[:2]

    def distill(store: BlockStore) -> list[BlockResult]:
        results, interrupted = LocalDistiller(teacher.model, teacher.blocks, owned, data, cfg, store, rt.device,
                                              SequentialSchedule(), 0, teacher.val_acc).run()
        assert not interrupted
        return results

    straight = distill(BlockStore(RunDir(tmp_path / "a"), "fp"))
    store = BlockStore(RunDir(tmp_path / "b"), "fp")

    def killed(self, unit, result):
        raise _Killed

    monkeypatch.setattr(BlockStore, "save_finished", killed)
    with pytest.raises(_Killed):
        distill(store)
    monkeypatch.undo()
    saved = store.resume(owned[0])
    assert saved is not None and saved["epoch"] == (1 if early_stop else 2) and saved["step"] == 0
    resumed = distill(store)
    assert [r.epochs for r in resumed] == [r.epochs for r in straight] == [1 if early_stop else 2] * 2
    assert [r.early_stopped for r in resumed] == [early_stop] * 2
    assert resumed[0].resumed and resumed[0].history == straight[0].history
    for a, b in zip(straight, resumed):
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert not any(store.run_dir.block(u, partial=True).exists() for u in owned)


def test_run_dir_refuses_blocks_of_another_job(tmp_path: Path):
    run_dir = RunDir(tmp_path)
    units = job_units(2, [Candidate.parse("lowrank")])
    BlockStore(run_dir, "job-a").save_finished(units[0], {"state_dict": {}, "metrics": {}})
    assert run_dir.finished_units("job-a", units) == [0]
    with pytest.raises(RunDirConflict, match="different job"):
        run_dir.finished_units("job-b", units)
    BlockStore(run_dir, "job-a").save_partial(units[1], {"epoch": 1})
    with pytest.raises(RunDirConflict):
        BlockStore(run_dir, "job-b").resume(units[1])


def test_finetune_keeps_its_best_epoch_and_resumes_from_its_partial(tmp_path: Path, tiny_teacher: Path, rt):
    cfg = _cfg(tmp_path, tiny_teacher, "finetune.epochs=2", "finetune.keep=best-val")
    _, run_dir, data, teacher, *_ = _through_plan(cfg, rt)
    student = pipeline.build_model(cfg.model.arch, data.num_classes, cfg.model.width)
    student.load_state_dict(teacher.model.state_dict())
    history = finetune(student, teacher.model, data, cfg, rt.device, run_dir.finetune_partial, "id")
    assert all(isinstance(h, FinetuneEpoch) for h in history)
    assert [h.epoch for h in history] == [1, 2] and sum(h.kept for h in history) == 1
    best = max(history, key=lambda h: h.val_acc)
    assert next(h for h in history if h.kept).val_acc == best.val_acc
    assert not run_dir.finetune_partial.exists()  # removed once finished


def test_job_record_round_trips_and_a_damaged_report_is_named(tmp_path: Path, tiny_teacher: Path, rt):
    cfg = _cfg(tmp_path, tiny_teacher, "finetune.epochs=0")
    record = pipeline.run_job(cfg, rt)
    assert record is not None
    again = JobRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record and isinstance(again.plan, Plan) and isinstance(again.plan.costs[0], BlockCost)
    assert record.to_json()["plan"]["predicted_speedup"] == record.plan.predicted_speedup
    text = summary_text(again)
    assert "accuracy (test)" in text and f"{len(record.blocks)}" in text
    bad = tmp_path / "report.json"
    bad.write_text('{"status": "completed"')
    with pytest.raises(ValueError, match="report.json"):
        JobRecord.load(bad)


def test_sequential_schedule_predicts_every_prefix():
    costs = [BlockCost(1.0, 0.5), BlockCost(2.0, 0.25), BlockCost(3.0, 0.125)]
    plan = Plan(2, [[0, 2], [1]], [0, 0], 3.625, 0, 0, "exact", True, costs)
    assert schedule_for("parallel").predicted_per_batch(plan) == 3.625
    assert SequentialSchedule().predicted_per_batch(plan) == pytest.approx(max(1.5 + 3.125, 2.25))
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_for("fastest")


@pytest.mark.parametrize("module", ["hpc_bkd.planning.planner", "hpc_bkd.planning.schedule", "hpc_bkd.store.records"])
def test_planner_and_records_import_without_torch(module: str):
    code = f"import sys; sys.modules['torch'] = None; import {module}"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
