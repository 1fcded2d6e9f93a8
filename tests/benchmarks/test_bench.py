"""The benchmark's outputs (structure, not timings) and the end-to-end KD baseline."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_env

from hpc_bkd.config import load_config
from hpc_bkd.store.records import JobRecord

if str(REPO) not in sys.path:  # benchmarks/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(REPO))

# report.json of a real 2-rank `tiny` run whose one team of 2 trained all 8 blocks (teacher cache on)
TEAM_REPORT = Path(__file__).resolve().parents[1] / "fixtures" / "report-tiny-2ranks-team.json"


def test_kd_baseline_tiny(tmp_path: Path, tiny_teacher: Path):
    from benchmarks.baseline import KDRecord, build_baseline_student, run_baseline
    from benchmarks.bench import kd_metrics
    from hpc_bkd.blocks.models import build_model
    from hpc_bkd.blocks.students import build_student
    from hpc_bkd.blocks.surgery import assemble, find_blocks
    from hpc_bkd.data.sources import load_data
    from hpc_bkd.distill.teacher import load_teacher_checkpoint

    threads = torch.get_num_threads()
    try:
        cfg = load_config("tiny", [f"teacher.checkpoint={tiny_teacher}", "run.threads=1", "run.device=cpu"])
        # within=100 points: the first epoch already counts as "close to the teacher"
        result = run_baseline(cfg, epochs=2, within=100.0, run_dir=tmp_path / "kd")
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "kd" / "kd_baseline.json").read_text())
    assert saved["final_test_acc"] == result.final_test_acc
    assert KDRecord.from_json(saved) == result  # the record round-trips through its JSON
    m = kd_metrics(result)
    json.dumps(m)  # plain JSON: no record leaks into bench.json
    assert m["timeline"] == [{"epoch": h["epoch"], "time_s": h["cumulative_s"], "val_acc": h["val_acc"]}
                             for h in saved["history"]]
    assert m["time_to_within"] == saved["time_to_within"]["val"] and m["blocks_replaced"] == list(range(8))
    hist = saved["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(0 <= h["val_acc"] <= 100 and 0 <= h["test_acc"] <= 100 and h["epoch_s"] > 0 for h in hist)
    assert hist[1]["cumulative_s"] == pytest.approx(hist[0]["cumulative_s"] + hist[1]["epoch_s"])
    assert saved["train_s"] == pytest.approx(hist[-1]["cumulative_s"])
    assert saved["final_test_acc"] == hist[-1]["test_acc"]
    assert saved["time_to_within"]["val"] == {"epoch": 1, "time_s": hist[0]["cumulative_s"], "acc": hist[0]["val_acc"]}
    assert saved["time_to_within"]["test"]["epoch"] == 1
    assert 0 <= saved["teacher"]["test_acc"] <= 100 and saved["threads"] == 1
    assert saved["blocks"] == 8 and saved["blocks_replaced"] == list(range(8))
    assert saved["models"]["student"]["conv_params"] < saved["models"]["teacher"]["conv_params"]

    # the same architecture as the PBKD student (teacher with every block swapped), no teacher weights
    data = load_data(cfg.data, cfg.run.seed)
    teacher = load_teacher_checkpoint(tiny_teacher, build_model(cfg.model.arch, data.num_classes, cfg.model.width))
    blocks = find_blocks(teacher, data.input_shape, cfg.blocks.granularity)
    pbkd = assemble(teacher, {b.index: build_student(b, cfg.blocks.student_depth, cfg.blocks.student_width)
                              for b in blocks}, blocks)
    fresh = build_baseline_student(cfg, data.num_classes, blocks)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(fresh) == shapes(pbkd)
    t_state = teacher.state_dict()
    assert not any(torch.equal(v, t_state[k]) for k, v in fresh.state_dict().items()
                   if k in t_state and v.is_floating_point() and v.numel() > 1 and "running" not in k)
    trained = torch.load(tmp_path / "kd" / "kd_student.pt", weights_only=True)["state_dict"]
    assert shapes(pbkd) == {k: tuple(v.shape) for k, v in trained.items()}


@pytest.mark.slow
def test_bench_quick(tmp_path: Path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--ranks", "1,2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=cli_env())
    assert proc.returncode == 0, f"bench exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for label in ("phase distill+gather s", "distill makespan s", "predicted makespan s", "parallel efficiency",
                  "block-img/s per rank", "peak MB per rank", "student test acc (final)", "energy", "targets:"):
        assert label in proc.stdout, label

    bench = json.loads((out / "bench.json").read_text())
    hw = bench["hardware"]
    assert hw["cpu_model"] and hw["cores"] >= 1 and hw["torch"] == torch.__version__ and "gpus" in hw
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // 2)
    assert bench["settings"]["threads"] == threads and bench["settings"]["ranks"] == [1, 2]
    runs = bench["runs"]
    assert list(runs) == ["pbkd-1", "pbkd-2", "pbkd-2-blocks", "sequential-1", "kd-e2e"]
    teacher_pt = out / "teacher" / "teacher.pt"
    assert teacher_pt.is_file()
    for name, run in runs.items():
        assert run["rc"] == 0 and run.get("metrics"), name
        assert f"run.threads={threads}" in run["cmd"] and f"teacher.checkpoint={teacher_pt}" in run["cmd"], name
        m = run["metrics"]
        assert 0 <= m["student_test_acc"] <= 100
        assert m["energy_text"] == "unavailable" or m["energy_text"].endswith("J")
        assert len(m["ranks"]) == m["world_size"] and all(r["peak_mem_mb"] > 0 for r in m["ranks"])
    assert "mpirun" in runs["pbkd-2"]["cmd"] and "-np 2" in runs["pbkd-2"]["cmd"]
    assert "plan.hybrid=false" in runs["pbkd-2-blocks"]["cmd"]
    assert "distill.schedule=sequential" in runs["sequential-1"]["cmd"]
    for name in ("pbkd-1", "pbkd-2", "pbkd-2-blocks", "sequential-1"):
        m = runs[name]["metrics"]
        assert m["distill_s"] > 0 and m["predicted_distill_s"] > 0 and m["prediction_error"] is not None
        assert set(m["phases_s"]) >= {"data", "plan", "distill+gather", "assemble", "finetune"}
        assert all(r["block_images_per_s"] > 0 for r in m["ranks"] if r["blocks"])
        report = json.loads(Path(runs[name]["result"]).read_text())
        assert report["config"]["teacher"]["checkpoint"] == str(teacher_pt)
        assert report["config"]["run"]["threads"] == threads and report["world_size"] == m["world_size"]
    assert runs["sequential-1"]["metrics"]["schedule"] == "sequential"
    m2 = runs["pbkd-2"]["metrics"]
    assert m2["speedup"] > 0 and m2["efficiency"] == pytest.approx(m2["speedup"] / 2)
    kd = runs["kd-e2e"]["metrics"]
    assert kd["epochs"] == 2 and len(kd["history"]) == 2

    assert [p["ranks"] for p in bench["scaling"]["hybrid"]] == [1, 2]
    assert [p["ranks"] for p in bench["scaling"]["blocks"]] == [1, 2]
    assert bench["targets"] and all({"target", "value", "met"} <= set(t) for t in bench["targets"])
    assert any("efficiency" in t["target"] for t in bench["targets"])
    assert any("sequential" in t["target"] for t in bench["targets"])
    assert any("end-to-end KD" in t["target"] for t in bench["targets"])
    # issue 20: the ceiling is the job's own distillation, 2 copies at once; the heartbeat's cost is shown
    ceiling = bench["machine_ceiling"]
    assert ceiling["procs"] == 2 and len(ceiling["together_s"]) == 2 and ceiling["alone_s"] > 0
    assert ceiling["efficiency_ceiling"] == pytest.approx(ceiling["alone_s"] / (sum(ceiling["together_s"]) / 2))
    assert ceiling["fixed_loop"]["efficiency_ceiling"] > 0
    assert any("over the real-work ceiling, 2 ranks" in t["target"] for t in bench["targets"])
    for name in ("pbkd-2", "pbkd-2-blocks"):
        shares = [r["heartbeat_share"] for r in runs[name]["metrics"]["ranks"]]
        assert all(s is not None and 0 <= s < 0.01 for s in shares), (name, shares)
    assert runs["pbkd-1"]["metrics"]["ranks"][0]["heartbeat_share"] is None  # one rank: no heartbeat
    assert any("heartbeat thread" in t["target"] for t in bench["targets"])
    assert "heartbeat % of a core" in proc.stdout and "Real-work ceiling" in proc.stdout
    assert bench["notes"] and "table" in bench
    for png in ["speedup.png", "time_to_accuracy.png"] + [f"gantt-{n}.png" for n in list(runs)[:4]]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
        assert png in bench["plots"]
    assert (out / "bench.txt").read_text().startswith("hpc_bkd bench: tiny")


def test_median_round_keeps_the_middle_makespan():
    from benchmarks.bench import median_round

    tries = [{"name": "pbkd-1", "metrics": {"distill_s": s}} for s in (30.0, 10.0, 20.0)]
    chosen = median_round(tries)
    assert chosen["metrics"]["distill_s"] == 20.0
    assert chosen["rounds_distill_s"] == [30.0, 10.0, 20.0] == chosen["metrics"]["rounds_distill_s"]
    assert median_round(tries[:2])["metrics"]["distill_s"] == 10.0  # even count: the lower middle
    failed = {"name": "pbkd-1", "rc": 1}
    assert median_round(tries + [failed]) is failed  # a failed round fails the bench


@pytest.mark.slow
def test_bench_repeat_runs_interleaved_rounds(tmp_path: Path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--ranks", "1", "--no-kd", "--repeat", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO, env=cli_env())
    assert proc.returncode == 0, f"bench exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    started = [line.split()[1] for line in proc.stdout.splitlines() if line.endswith("...")]
    assert started == ["pbkd-1-r1", "sequential-1-r1", "pbkd-1-r2", "sequential-1-r2"]
    bench = json.loads((out / "bench.json").read_text())
    for name in ("pbkd-1", "sequential-1"):
        run = bench["runs"][name]
        assert len(run["rounds_distill_s"]) == 2 and run["metrics"]["distill_s"] == min(run["rounds_distill_s"])
        assert (out / f"gantt-{name}.png").is_file()
    assert "rounds (median kept)" in proc.stdout


def test_pbkd_metrics_from_a_job_record():
    """The bench reads a report through JobRecord: every metric from the record's attributes."""
    from benchmarks.bench import derive, pbkd_metrics, table, targets_text

    data = json.loads(TEAM_REPORT.read_text())
    record = JobRecord.from_json(data)
    n_train = 600
    m = pbkd_metrics(record, n_train)
    json.dumps(m)  # plain JSON: no record leaks into bench.json

    bs, epochs = data["config"]["data"]["batch_size"], data["config"]["distill"]["epochs"]
    steps = n_train // bs
    assert m["world_size"] == 2 and m["schedule"] == "parallel" and m["teacher_cache"] is True
    assert m["plan_teams"] == [[0, 1]] and m["costs"] == data["plan"]["costs"]
    assert m["predicted_s_per_batch"] == data["plan"]["makespan"]
    assert m["predicted_distill_s"] == pytest.approx(data["plan"]["makespan"] * steps * epochs)
    distill_s = data["distill"]["makespan_s"]
    assert m["prediction_error"] == pytest.approx((m["predicted_distill_s"] - distill_s) / distill_s)
    assert m["plan_predicted_speedup"] == pytest.approx(data["plan"]["predicted_speedup"])
    # one team of two trains every block: each rank puts half of every batch through each block
    for row, rank in zip(m["ranks"], data["ranks"]):
        images = sum(epochs * steps * bs / 2 for _ in rank["blocks"])
        assert row["block_images_per_s"] == pytest.approx(images / rank["busy_s"])
        assert row["energy"] == {**{k: None for k in ("gpu_j", "cpu_package_j", "gpu_unavailable",
                                                       "cpu_unavailable")}, **rank["energy"]}
    assert m["accuracy"] == data["accuracy"] and m["accepted"] == [str(i) for i in data["accepted_blocks"]]
    assert m["student_test_acc"] == data["accuracy"]["student_after_finetune"]
    start = sum(data["phases_s"][k] for k in ("plan", "broadcast", "distill+gather", "assemble"))
    assert m["timeline"][0]["time_s"] == pytest.approx(start + data["finetune"][0]["time_s"])
    assert m["energy_text"] == "unavailable" and m["energy_reason"].startswith("CPU: ")

    # the sequential schedule's prediction comes from hpc_bkd.planning.schedule: each block pays its teacher prefix
    seq = copy.deepcopy(data)
    seq["config"]["distill"]["schedule"] = "sequential"
    ms = pbkd_metrics(JobRecord.from_json(seq), n_train)
    costs = data["plan"]["costs"]
    assert ms["predicted_s_per_batch"] == pytest.approx(max(
        sum(costs[b]["teacher"] + costs[b]["student"] for b in owned) for owned in data["plan"]["assignment"]))

    runs = {"pbkd-1": {"metrics": copy.deepcopy(m)}, "pbkd-2": {"metrics": m}, "sequential-1": {"metrics": ms}}
    derived = derive(runs, [1, 2])
    assert [p["ranks"] for p in derived["scaling"]["hybrid"]] == [1, 2] and m["speedup"] == pytest.approx(1.0)
    assert any(t["target"].startswith("1-rank PBKD vs sequential") for t in derived["targets"])
    text = table(runs, {"cpu_model": "cpu", "cores": 2, "torch": "x"}, {"config": "tiny", "threads": 1})
    assert "predicted makespan s" in text and "targets:" in targets_text(derived["targets"])


def test_bench_children_find_the_baseline_from_any_directory(tmp_path: Path):
    """The bench starts `python -m benchmarks.baseline` with its own environment: that must work
    whatever the working directory (benchmarks/ is not installed with the package)."""
    from benchmarks.bench import _env

    proc = subprocess.run([sys.executable, "-m", "benchmarks.baseline", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=_env(1))
    assert proc.returncode == 0, proc.stderr
    assert "--run-dir" in proc.stdout and "--blocks" in proc.stdout


@pytest.mark.slow
def test_select_bench_trains_once_and_chooses_per_budget(tmp_path: Path):
    """benchmarks.select_bench on the tiny job: one set of units, a student per budget, each
    reported with its predicted and measured latency; the tool's table, JSON and plot."""
    out = tmp_path / "select"
    cmd = [sys.executable, "-m", "benchmarks.select_bench", "--config", "tiny", "--out", str(out),
           "--budgets", "1.0,2.0", "--set", "blocks.candidates=separable-d1,lowrank-r0.25",
           "--set", "select.latency_batches=1", "--set", "finetune.epochs=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "select.json").read_text())
    assert [r["budget"] for r in result["budgets"]] == [1.0, 2.0] and (out / "budgets.png").is_file()
    assert result["candidates"]["candidates"] == 2 and result["candidates"]["ratio"] > 0
    for row in result["budgets"]:
        lat = row["latency_ms"]["1"]
        # the budget holds against the teacher timed with the options (the prediction's pass)
        assert lat["predicted"] <= row["budget"] * lat["teacher_predicted"] * (1 + 1e-9) and lat["measured"] > 0
        assert len(row["chosen"]) == 8 and row["front"]
    budgets = {b: JobRecord.load(out / "runs" / f"budget-{b:g}" / "report.json") for b in (1.0, 2.0)}
    assert all(sum(x.resumed_finished for x in r.blocks) == 16 for r in budgets.values())  # trained once
    assert "distillation: 2 candidates" in proc.stdout
