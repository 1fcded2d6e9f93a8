"""Watching and recording a job: ``hpc-bkd status`` on a job running under ``mpirun -np 2``, on the
same job finished and on one killed mid-distillation; its TensorBoard event files read back with
TensorBoard's own reader; its MLflow run on a real ``mlflow server`` (SQLite, on loopback) and in a
``file:`` store; the schedule picture from 1 rank x 26 units to 8 ranks x 100 units."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, MPIRUN, REPO, cli_env, hpc

from hpc_bkd.config import load_config
from hpc_bkd.job.plots import rank_segments
from hpc_bkd.job.status import job_status
from hpc_bkd.job.tracking import MlflowBackend, Trackers
from hpc_bkd.store.records import JobRecord
from hpc_bkd.store.rundir import RunDir

EPOCHS = 20  # a few seconds of distillation on the tiny job: long enough to be seen running


def _common(teacher: Path) -> list[str]:
    return ["-c", "tiny", "--set", f"teacher.checkpoint={teacher}", "--set", "run.threads=1",
            "--set", "run.log_interval_s=0.3", "--set", f"distill.epochs={EPOCHS}", "--set", "finetune.epochs=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server with a SQLite backend and proxied artifacts, on loopback."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            env=cli_env(), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the session it was started in
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:  # uvicorn waits for idle connections to close: no need here
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def two_rank_job(tmp_path_factory, tiny_teacher: Path, mlflow_server: str):
    """The tiny job on 2 ranks with both trackers, and what ``status`` said while it distilled."""
    run = tmp_path_factory.mktemp("two-ranks") / "run"
    args = [*_common(tiny_teacher), "--run-dir", str(run), "--set", "run.tracking=[tensorboard,mlflow]",
            "--set", f"run.mlflow_uri={mlflow_server}", "--set", "run.mlflow_experiment=watch-test"]
    proc = subprocess.Popen([str(MPIRUN), "-np", "2", sys.executable, "-m", "hpc_bkd", "run", *args], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, cli_seen, deadline = None, None, time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        st = job_status(run) if (run / "progress").is_dir() and list((run / "progress").glob("rank-*")) else None
        if st is not None and len(st.ranks) == 2 and all(r.phase == "distillation" and r.units_in_progress
                                                         for r in st.ranks):
            seen = st
            cli_seen = hpc("status", "--run-dir", str(run), "--json", check=False)
            break
        time.sleep(0.1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return run, seen, cli_seen, err


def test_status_shows_both_ranks_while_they_distill(two_rank_job):
    run, seen, cli_seen, _ = two_rank_job
    assert seen is not None, "status never saw both ranks distilling"
    assert seen.state == "running" and seen.size == 2 and seen.lost_ranks == [] and seen.phase == "distillation"
    assert sum(r.units_done + r.units_in_progress + r.units_left for r in seen.ranks) == 8  # every unit, once
    assert all(r.loss is not None and 0.0 < r.fraction < 1.0 and r.distill_left_s is not None for r in seen.ranks)
    assert seen.distill_left_s == max(r.distill_left_s for r in seen.ranks)
    live = json.loads(cli_seen.stdout)  # the command itself, during the run (no MPI of its own)
    assert cli_seen.returncode == 0 and live["size"] == 2 and live["state"] in ("running", "finished")
    assert [r["rank"] for r in live["ranks"]] == [0, 1]


def test_status_of_the_finished_job_has_its_figures(two_rank_job):
    run, _, _, _ = two_rank_job
    report = json.loads((run / "report.json").read_text())
    st = json.loads(hpc("status", "--run-dir", str(run), "--json").stdout)
    assert st["state"] == "finished" and st["lost_ranks"] == []
    assert st["final"]["student_test_acc"] == report["accuracy"]["student_after_finetune"]
    assert st["final"]["distill_makespan_s"] == report["distill"]["makespan_s"]
    assert all(r["state"] == "done" and r["units_left"] == 0 for r in st["ranks"])
    text = hpc("status", "--run-dir", str(run), "--watch", "1").stdout  # not running: printed once
    assert text.count("finished after") == 1 and "result: test acc teacher" in text


def test_tensorboard_event_files_read_back(two_rank_job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _, err = two_rank_job
    report = JobRecord.load(run / "report.json")
    (folder,) = (run / "tensorboard").iterdir()
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    unit = report.blocks[0]
    losses = [e.value for e in ea.Scalars(f"unit/{unit.index:03d}-{unit.candidate}/loss")]
    assert losses == pytest.approx([h["loss"] for h in unit.history], rel=1e-6) and len(losses) == EPOCHS
    assert len(ea.Scalars(f"unit/{unit.index:03d}-{unit.candidate}/swapped_val_acc")) >= 1
    assert ea.Scalars("accuracy/student_after_finetune")[0].value == pytest.approx(
        report.accuracy.student_after_finetune)
    for rank in (0, 1):  # rank 1's figures reached rank 0 through the gather
        assert ea.Scalars(f"rank/{rank}/images_per_s")[0].value > 0
        assert f"rank/{rank}/data_wait_s" in ea.Tags()["scalars"]
    assert "figures/gantt" in ea.Tags()["images"]
    assert ea.PluginTagToContent("hparams")  # the config, as hparams
    assert err.count("tensorboard: ") == 1  # only rank 0 talks to trackers


def test_mlflow_server_run_has_params_metrics_and_artifacts(two_rank_job, mlflow_server: str):
    from mlflow.tracking import MlflowClient

    run, _, _, _ = two_rank_job
    report = JobRecord.load(run / "report.json")
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("watch-test")
    (ml,) = client.search_runs([experiment.experiment_id])  # one run per job, not one per rank
    assert ml.data.params["model.arch"] == "vgg11" and ml.data.params["distill.epochs"] == str(EPOCHS)
    unit = report.blocks[-1]
    history = client.get_metric_history(ml.info.run_id, f"unit/{unit.index:03d}-{unit.candidate}/loss")
    assert [m.step for m in history] == list(range(1, EPOCHS + 1))
    assert ml.data.metrics["accuracy/teacher_test"] == pytest.approx(report.accuracy.teacher_test)
    assert {"report.json", "summary.txt", "gantt.png"} <= {a.path for a in client.list_artifacts(ml.info.run_id)}


def test_mlflow_file_store_gets_the_export_too(two_rank_job, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    run, _, _, _ = two_rank_job
    hpc("export", "--run-dir", str(run), "-c", "tiny", "--formats", "pt2")
    store = f"file:{tmp_path / 'mlruns'}"
    cfg = load_config("tiny", [f"run.dir={run}", "run.tracking=[mlflow]", f"run.mlflow_uri={store}"])
    trackers = Trackers.open(cfg, RunDir(run))
    assert [b.name for b in trackers.backends] == ["mlflow"]
    trackers.log_job(JobRecord.load(run / "report.json"), RunDir(run))
    client = MlflowClient(tracking_uri=store)
    (ml,) = client.search_runs([client.get_experiment_by_name("hpc_bkd").experiment_id])
    assert "export" in {a.path for a in client.list_artifacts(ml.info.run_id)}
    assert {Path(a.path).name for a in client.list_artifacts(ml.info.run_id, "export")} >= {"student.pt2"}


def test_an_unreachable_tracking_server_is_a_warning(caplog: pytest.LogCaptureFixture, tmp_path: Path):
    cfg = load_config("tiny", [f"run.dir={tmp_path}", "run.tracking=[mlflow,tensorboard]",
                               f"run.mlflow_uri=http://127.0.0.1:{_free_port()}"])
    with caplog.at_level(logging.WARNING, logger="hpc_bkd"):
        trackers = Trackers.open(cfg, RunDir(tmp_path))
    assert [b.name for b in trackers.backends] == ["tensorboard"]
    assert "cannot be reached" in caplog.text and "not tracked in mlflow" in caplog.text
    assert MlflowBackend(load_config("tiny", [f"run.dir={tmp_path}"]), RunDir(tmp_path)).uri.startswith("file:")


def test_status_of_a_job_killed_mid_distillation(tmp_path: Path, tiny_teacher: Path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hpc_bkd", "run", *_common(tiny_teacher), "--run-dir", str(run),
                             "--set", "distill.epochs=400"], cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None and time.time() < deadline
        st = job_status(run) if list((run / "progress").glob("rank-*")) else None
        if st is not None and st.phase == "distillation" and st.ranks[0].units_in_progress:
            break
        time.sleep(0.1)
    proc.kill()  # SIGKILL: nothing is written on the way out
    proc.wait(timeout=30)
    st = json.loads(hpc("status", "--run-dir", str(run), "--json").stdout)
    assert st["state"] == "stopped" and st["lost_ranks"] == [0] and st["final"] is None
    (rank,) = st["ranks"]
    assert rank["state"] == "lost" and rank["phase"] == "distillation" and rank["units_in_progress"] >= 1
    assert 0.0 < rank["fraction"] < 1.0
    text = hpc("status", "--run-dir", str(run)).stdout
    assert "stopped" in text and "run the same command again to resume" in text and "lost ranks: 0" in text


def test_status_of_no_job_is_a_user_error(tmp_path: Path):
    proc = hpc("status", "--run-dir", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_schedule_segments_and_pictures_at_both_scales(two_rank_job, tmp_path: Path):
    from hpc_bkd.job.plots import draw

    run, _, _, _ = two_rank_job
    record = JobRecord.load(run / "report.json")
    segments = rank_segments(record)
    for rank, segs in segments.items():
        names = [n for n, _, _ in segs]
        assert "distillation" in names and "cost timing" in names
        assert all(a[2] <= b[1] + 1e-6 for a, b in zip(segs, segs[1:])), f"rank {rank} overlaps"
    assert segments[0][-1][0] in ("finetune", "evaluate", "inference", "export")
    assert segments[1][-1][0] == "waiting for rank 0" and segments[1][-1][2] == pytest.approx(segments[0][-1][2])
    assert {round(next(e for n, _, e in segs if n == "gather"), 6) for segs in segments.values()} == \
        {round(next(e for n, _, e in segments[0] if n == "gather"), 6)}  # one gather ends it for all
    old = dataclasses.replace(record, ranks=[dataclasses.replace(r, phases=[], work=[]) for r in record.ranks])
    assert all([n for n, _, _ in segs][0] == "distillation" for segs in rank_segments(old).values())  # older reports
    draw(old, tmp_path / "gantt-old.png")
    for ranks, units in ((1, 26), (8, 100)):
        big = _synthetic(record, ranks, units)
        draw(big, tmp_path / f"gantt-{ranks}x{units}.png")
        assert (tmp_path / f"gantt-{ranks}x{units}.png").stat().st_size > 10_000


def _synthetic(record: JobRecord, ranks: int, units: int) -> JobRecord:
    """``record``'s rank 0 timeline given to ``ranks`` ranks sharing ``units`` units round robin, each
    stretching its distillation by its share (epochs as stretches of work on all its units)."""
    base = record.ranks[0]
    start = next(s for n, s, _ in base.phases if n == "distillation")
    rows = []
    for r in range(ranks):
        own = list(range(r, units, ranks))
        length = 2.0 * len(own) * (1 + 0.1 * r)
        phases = [[n, s, e] for n, s, e in base.phases if s < start] + [["distillation", start, start + length]]
        work = [[start + length * k / 8, start + length * (k + 1) / 8, k + 1, own, 10] for k in range(8)]
        rows.append(dataclasses.replace(base, rank=r, blocks=own, phases=phases, work=work))
    blocks = [dataclasses.replace(record.blocks[0], index=i, unit=i) for i in range(units)]
    return dataclasses.replace(record, ranks=rows, blocks=blocks)
