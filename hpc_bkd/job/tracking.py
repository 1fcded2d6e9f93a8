"""Experiment tracking (``run.tracking``): a finished job's figures in TensorBoard and MLflow.

Only rank 0 talks to trackers, once, from the job record: every other rank's figures reach it in
the gather (``pipeline.gather_outcomes``), and a tracker that is slow or gone then costs the job
nothing it has not already saved. What is logged is decided once here (``job_metrics``,
``job_params``, ``job_files``); each backend is a small class that only knows how to write them.

A backend whose package is missing or whose server cannot be reached is a warning when the job
starts and the job goes on without it (its report is in the run directory either way); one that
fails at the end is a warning too, never a lost run.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hpc_bkd.config import TRACKERS

if TYPE_CHECKING:
    from hpc_bkd.config import Config
    from hpc_bkd.store.records import JobRecord
    from hpc_bkd.store.rundir import RunDir

log = logging.getLogger("hpc_bkd")


@dataclass(frozen=True)
class Metric:
    """One figure of the job: ``key`` at ``step`` (an epoch, or 0 for figures of the whole job)."""

    key: str
    value: float
    step: int = 0


# ------------------------------------------------------------------------------ what is logged


def job_metrics(r: JobRecord) -> list[Metric]:
    """Per unit its loss, learning rate, swapped accuracy and KL per epoch; per rank its throughput
    and data wait; the teacher's and the student's accuracy; latencies predicted and measured."""
    out: list[Metric] = []
    for b in r.blocks:
        unit = _key(f"{b.index:03d}-{b.candidate}" if b.candidate else f"{b.index:03d}")
        for h in b.history:
            step = int(h.get("epoch", 0))
            out += [Metric(f"unit/{unit}/{k}", float(v), step) for k, v in h.items() if k != "epoch"]
    batch = r.config.data.batch_size
    for row in r.ranks:
        steps = sum(int(w[4]) for w in row.work if len(w) > 4)  # teacher batches this rank stepped
        unit_steps = sum(int(w[4]) * len(w[3]) for w in row.work if len(w) > 4)
        busy = max(row.busy_s, 1e-9)
        out += [Metric(f"rank/{row.rank}/busy_s", row.busy_s), Metric(f"rank/{row.rank}/idle_s", row.idle_s),
                Metric(f"rank/{row.rank}/data_wait_s", row.data_wait_s or 0.0)]
        if steps:
            out += [Metric(f"rank/{row.rank}/images_per_s", steps * batch / busy),
                    Metric(f"rank/{row.rank}/unit_steps_per_s", unit_steps / busy)]
    a = r.accuracy
    out += [Metric("accuracy/teacher_test", a.teacher_test), Metric("accuracy/teacher_val", a.teacher_val),
            Metric("accuracy/student_assembled", a.student_assembled),
            Metric("accuracy/student_before_finetune", a.student_before_finetune),
            Metric("accuracy/student_after_finetune", a.student_after_finetune)]
    out += [Metric(f"finetune/{k}", float(getattr(e, k)), e.epoch) for e in r.finetune for k in ("loss", "val_acc")]
    out += [Metric("job/wall_s", r.wall_s), Metric("job/distill_makespan_s", r.distill.makespan_s),
            Metric("plan/predicted_makespan_s_per_batch", r.plan.makespan),
            Metric("plan/predicted_speedup", r.plan.predicted_speedup)]
    return out + _latency_metrics(r)


def _latency_metrics(r: JobRecord) -> list[Metric]:
    out = []
    if r.inference is not None:
        c = r.inference.models
        out += [Metric("latency/teacher_ms", c.teacher.latency_ms_median),
                Metric("latency/student_ms", c.student.latency_ms_median),
                Metric("throughput/teacher_images_per_s", c.teacher.throughput_ips),
                Metric("throughput/student_images_per_s", c.student.throughput_ips)]
    s = r.selection
    if s is not None:
        out += [Metric(f"selection/predicted/{_key(k)}", v) for k, v in s.predicted.items()]
        out += [Metric(f"selection/measured/{_key(k)}", v) for k, v in s.measured.items()]
    return out


def _key(text: str) -> str:
    """A metric name both trackers accept (MLflow allows letters, digits, ``_-./`` and spaces)."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)


def job_params(cfg: Config) -> dict[str, str | float | int | bool]:
    """The config as flat ``section.key`` parameters (lists and nulls as text)."""
    flat: dict[str, str | float | int | bool] = {}
    for section, values in cfg.to_dict().items():
        for key, value in (values or {}).items():
            flat[f"{section}.{key}"] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return flat


def job_files(run_dir: RunDir) -> tuple[list[Path], list[Path]]:
    """(files, images): report.json, summary.txt, the plots (also as images) and the export folder."""
    images = [p for p in (run_dir.gantt, run_dir.pareto) if p.is_file()]
    files = [p for p in (run_dir.report, run_dir.summary) if p.is_file()] + images
    if run_dir.export_dir.is_dir():
        files.append(run_dir.export_dir)
    return files, images


# ------------------------------------------------------------------------------ backends


class Backend:
    """One tracker. ``unusable`` is asked when the job starts (a reason, or None); ``log_job``
    once, when the job is reported. ``modules``: what it imports, found (not imported) at the start
    and imported by a thread while the job runs (``mlflow`` alone takes a second or two)."""

    name: ClassVar[str] = ""
    modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config, run_dir: RunDir) -> None:
        self.cfg, self.run_dir = cfg, run_dir

    def unusable(self) -> str | None:
        missing = [m for m in self.modules if importlib.util.find_spec(m.split(".")[0]) is None]
        return f"{missing[0]} is not installed (pip install -e '.[tracking]')" if missing else None

    def warm_up(self) -> None:
        for module in self.modules:
            importlib.import_module(module)

    def log_job(self, record: JobRecord) -> None:
        raise NotImplementedError


class TensorBoardBackend(Backend):
    """Event files under ``<run.dir>/tensorboard/job-<time>/`` (a folder per job start: TensorBoard
    shows each as its own run, and a resumed job's figures do not mix with the first try's)."""

    name = "tensorboard"
    modules = ("tensorboard", "torch.utils.tensorboard")

    def log_job(self, record: JobRecord) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = self.run_dir.tensorboard_dir / time.strftime("job-%Y%m%d-%H%M%S")
        metrics = job_metrics(record)
        with SummaryWriter(str(folder)) as writer:
            for m in metrics:
                writer.add_scalar(m.key, m.value, m.step)
            for path in job_files(self.run_dir)[1]:
                writer.file_writer.add_summary(_png_summary(f"figures/{path.stem}", path.read_bytes()), 0)
            whole = {m.key: m.value for m in metrics if m.key.startswith("accuracy/")}
            for summary in hparams(job_params(record.config), whole):  # the config as hparams, in this run
                writer.file_writer.add_summary(summary)
        log.info("tensorboard: %d figures in %s", len(metrics), folder)


def _png_summary(tag: str, png: bytes) -> Any:
    """An image summary of a PNG file as it is (TensorBoard stores images PNG-encoded: decoding
    and encoding it again took longer than everything else logged)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # the IHDR chunk
    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)  # 4: RGBA
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class MlflowBackend(Backend):
    """One MLflow run per job: the config as params, the figures as metrics, the report, summary,
    plots and export as artifacts. ``run.mlflow_uri``: a server URL or a local ``file:``/``sqlite:``
    store (default: ``$MLFLOW_TRACKING_URI``, else ``file:<run.dir>/mlruns``)."""

    name = "mlflow"

    @property
    def uri(self) -> str:
        uri = self.cfg.run.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return uri or (self.run_dir.root.resolve() / "mlruns").as_uri()

    modules = ("mlflow", "mlflow.tracking", "mlflow.entities")

    def unusable(self) -> str | None:
        missing = super().unusable()
        if missing is None and self.uri.startswith(("http://", "https://")):
            return _unreachable(self.uri)
        return missing

    def log_job(self, record: JobRecord) -> None:
        from mlflow.entities import Metric as MlMetric
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # a server gone since the start must cost minutes at most, not the client's long retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        if self.uri.startswith("file:"):  # MLflow 3 refuses its file store unless asked: a file: URI is asking
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=self.uri)
        name = self.cfg.run.mlflow_experiment
        experiment = client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
        run = client.create_run(exp_id, run_name=f"{record.config.model.arch} {record.finished_at}",
                                tags={"run_dir": str(self.run_dir.root.resolve()), "world_size": str(record.world_size)})
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        params = [Param(k, str(v)[:6000]) for k, v in job_params(record.config).items()]
        metrics = [MlMetric(m.key, m.value, now, m.step) for m in job_metrics(record)]
        for chunk in _chunks(params, 100):
            client.log_batch(run_id, params=chunk)
        for mchunk in _chunks(metrics, 1000):
            client.log_batch(run_id, metrics=mchunk)
        for path in job_files(self.run_dir)[0]:
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=path.name)
            else:
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)
        log.info("mlflow: run %s in experiment %r at %s", run_id, name, self.uri)


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _unreachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why the tracking server at ``uri`` does not answer (its /health page), or None."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as reply:
            reply.read(64)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"the tracking server {uri} cannot be reached ({getattr(exc, 'reason', exc)})"
    return None


def _warm_up(backends: list[Backend]) -> None:
    for backend in backends:
        try:
            backend.warm_up()
        except Exception as exc:  # log_job imports it again, and says what failed
            log.debug("tracking: importing %s failed early: %r", backend.name, exc)


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TensorBoardBackend, MlflowBackend)}
assert tuple(BACKENDS) == TRACKERS, "config.TRACKERS names the backends run.tracking accepts"


@dataclass(frozen=True)
class Trackers:
    """The job's usable trackers (rank 0 only), their modules imported by ``warming`` meanwhile."""

    backends: tuple[Backend, ...] = ()
    warming: threading.Thread | None = None

    @classmethod
    def open(cls, cfg: Config, run_dir: RunDir) -> Trackers:
        """The trackers of ``run.tracking`` that can be used; each that cannot is a warning now."""
        usable = []
        for name in cfg.run.tracking:
            backend = BACKENDS[name](cfg, run_dir)
            why = backend.unusable()
            if why:
                log.warning("tracking: %s; this job is not tracked in %s (its report is in %s)", why, name, run_dir)
            else:
                usable.append(backend)
        if not usable:
            return cls()
        warming = threading.Thread(target=_warm_up, args=(usable,), name="hpc_bkd-trackers", daemon=True)
        warming.start()
        return cls(tuple(usable), warming)

    def log_job(self, record: JobRecord, run_dir: RunDir) -> dict[str, float]:
        """Hand the reported job to every tracker; returns the seconds each took (its overhead)."""
        seconds = {}
        if self.warming is not None:
            self.warming.join()
        for backend in self.backends:
            t0 = time.perf_counter()
            try:
                backend.log_job(record)
            except Exception as exc:  # the job is done and reported: a tracker must not fail it now
                log.warning("tracking: %s failed (%r); the job's report is in %s", backend.name, exc, run_dir)
            seconds[backend.name] = time.perf_counter() - t0
        if seconds:
            log.info("tracking took %s", ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()))
        return seconds
