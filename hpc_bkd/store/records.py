"""The job record: the one schema of ``report.json``.

Every reader of a report (``report`` for the summary and plots, the benchmark and KD-baseline
drivers, tests, users' scripts) goes through ``JobRecord.from_json`` and attribute access, and the
pipeline builds it once, so a field is added, renamed or documented in exactly one place. The
records are torch-free on purpose: reading a report needs no model code.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hpc_bkd.config import Config
from hpc_bkd.planning.planner import BlockCost, Plan

T = TypeVar("T")


def to_plain(obj: Any) -> Any:
    """A record (or anything holding records) as JSON-ready dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        extra = getattr(obj, "json_extra", None)
        out = {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {**out, **(extra() if extra else {})}
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def from_plain(cls: type[T], data: Any) -> T:
    """The inverse of ``to_plain`` for the record type ``cls`` (keys a record does not declare, such
    as derived values written for people, are ignored)."""
    return _convert(cls, data)


def _convert(tp: Any, data: Any) -> Any:
    if data is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(inner[0], data) if len(inner) == 1 else data
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        return tp(**{k: _convert(hints[k], v) for k, v in data.items() if k in names})
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_convert(item, v) for v in data]
    if origin is tuple:  # tuple[X, ...] or a fixed tuple[X, Y]; JSON gives lists
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in data)
        return tuple(_convert(a, v) for a, v in zip(args, data))
    if origin is dict:
        key, value = typing.get_args(tp)
        return {(int(k) if key is int else k): _convert(value, v) for k, v in data.items()}
    return data


def record_from(cls: type[T], *sources: Any, **fields: Any) -> T:
    """A ``cls`` record whose fields are taken from the same-named attributes of ``sources`` (the
    first that has one), with ``fields`` given explicitly: how a stage's record becomes the report's
    without a hand-kept copy of every field (a field added to both travels by itself)."""
    values = dict(fields)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in values or not f.init:
            continue
        for source in sources:
            if source is not None and hasattr(source, f.name):
                values[f.name] = getattr(source, f.name)
                break
    return cls(**values)


R = TypeVar("R", bound="JsonRecord")


class JsonRecord:
    """A record whose JSON file is ``to_json`` of it: the one place such records are converted
    (``to_plain``/``from_plain``) and read back from a file."""

    def to_json(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        return from_plain(cls, data)

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a file ``to_json`` wrote; a damaged or foreign one raises ``ValueError`` naming it."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a readable {cls.__name__} file ({exc!r})") from None


@dataclass(frozen=True)
class CacheReport:
    """Whether ranks cached the teacher's activations, and why (``teacher_cache.decide``)."""

    use: bool
    needed_mb: float
    budget_mb: float
    reason: str


@dataclass(frozen=True)
class CacheUse:
    """What one rank's teacher cache held and how long filling it took."""

    mb: float
    fill_s: float


@dataclass(frozen=True)
class Energy:
    """Joules over the distillation, or why a counter was unavailable (``energy.EnergyMeter``)."""

    gpu_j: float | None = None
    cpu_package_j: float | None = None
    gpu_unavailable: str | None = None
    cpu_unavailable: str | None = None

    def describe(self) -> tuple[str, str]:
        """(GPU, CPU package) for people: joules, or why the counter was unavailable."""
        gpu = f"{self.gpu_j:.0f} J" if self.gpu_j is not None else f"unavailable ({self.gpu_unavailable})"
        cpu = (f"{self.cpu_package_j:.0f} J" if self.cpu_package_j is not None
               else f"unavailable ({self.cpu_unavailable})")
        return gpu, cpu


@dataclass(frozen=True)
class BlockRecord:
    """One block: what it is in the teacher, who trained it, how it went, whether it was kept."""

    index: int
    name: str
    members: list[str]
    in_shape: list[int]
    out_shape: list[int]
    teacher_params: int
    teacher_macs: int
    rank: int | None
    train_time_s: float
    epochs: int | None
    final_loss: float | None
    swapped_val_acc: float | None
    accepted: bool
    early_stopped: bool
    resumed: bool              # continued from an unfinished checkpoint
    resumed_finished: bool     # finished by an earlier run of the job, not trained now
    spans: list[list[float]]   # wall-clock (start, end) of each training session
    history: list[dict[str, float]]
    cost: BlockCost
    candidate: str = ""                # the kind of student (``candidates``); a record per unit
    unit: int | None = None
    swapped_val_kl: float | None = None


@dataclass(frozen=True)
class RankRecord:
    """One rank's distillation: where it ran, what it trained, how busy it was."""

    rank: int
    host: str
    device: str
    threads: int
    blocks: list[int]
    busy_s: float
    idle_s: float
    predicted_s_per_batch: float
    peak_mem_mb: float
    energy: Energy
    teacher_cache: CacheUse | None = None
    local_rank: int | None = None  # rank on its node (picks the GPU); None in reports from before it was recorded
    data_wait_s: float | None = None  # distillation seconds spent waiting for input batches (None: not recorded)
    bad_images: int = 0               # unreadable image files skipped (data.on_bad_image: skip)
    heartbeat_cpu_s: float | None = None  # CPU seconds of the rank's heartbeat thread up to the gather (None: off)
    heartbeat_wall_s: float | None = None  # seconds that thread had run by then
    phases: list[list[Any]] = field(default_factory=list)  # [name, start, end] per phase up to the gather
                                                           # (``progress``; empty in older reports)
    work: list[list[Any]] = field(default_factory=list)    # [start, end, epoch, unit ids, steps] per stretch
                                                           # of distillation steps on the same units

    @property
    def heartbeat_share(self) -> float | None:
        """The heartbeat thread's share of one core (None: no heartbeat): the cost of peer detection."""
        if self.heartbeat_cpu_s is None or not self.heartbeat_wall_s:
            return None
        return self.heartbeat_cpu_s / self.heartbeat_wall_s


@dataclass(frozen=True)
class DistillTimes:
    """The distillation phase across ranks (epoch seconds) and its MPI traffic."""

    start: float
    end: float
    makespan_s: float
    resumed_blocks: list[int]
    broadcast_s: float
    gather_s: float


@dataclass(frozen=True)
class Accuracy:
    """Test accuracy (percent) of the teacher and of the student at each step of its making."""

    teacher_test: float
    teacher_val: float
    student_assembled: float
    student_before_finetune: float
    student_after_finetune: float


@dataclass(frozen=True)
class ModelSize:
    params: int
    conv_params: int
    macs: int  # multiply-accumulates of one image's forward


@dataclass(frozen=True)
class ModelSizes:
    teacher: ModelSize
    student: ModelSize


@dataclass(frozen=True)
class FinetuneEpoch:
    epoch: int
    loss: float
    val_acc: float
    time_s: float
    kept: bool = False  # the epoch whose weights the student keeps (best validation accuracy)


# ----------------------------------------------------------------------- inference (``deploy``)


@dataclass(frozen=True)
class InferenceMeasurement(JsonRecord):
    """One model's measured speed on one device and runtime."""

    name: str
    runtime: str                  # eager | torch.export | onnxruntime
    device: str                   # cpu, cuda:0, ...
    device_name: str              # CPU model or GPU name
    threads: int                  # CPU threads used
    timer: str                    # perf_counter | cuda events
    layout: str                   # batch 1: contiguous | channels_last (the faster, when probed)
    layout_probe_ms: dict[str, float]  # batch-1 median per layout tried
    throughput_layout: str        # the same choice at the throughput batch (it can differ)
    throughput_layout_probe_ms: dict[str, float]
    input_shape: tuple[int, ...]  # C, H, W
    latency_runs: int
    latency_ms_median: float      # batch 1
    latency_ms_p90: float
    latency_halves_ms: tuple[float, float]  # median of each half of the samples
    throughput_batch: int
    throughput_runs: int
    throughput_ips: float         # images per second at throughput_batch (median forward)
    throughput_halves_ips: tuple[float, float]
    noisy: bool                   # some pair of halves differs by more than NOISE_TOLERANCE

    def where(self) -> str:
        """``cpu (AMD EPYC, 1 thread)``: the device as a summary line names it."""
        if self.device.startswith("cuda"):
            return f"{self.device} ({self.device_name})"
        return f"{self.device} ({self.device_name}, {self.threads} thread{'s' if self.threads != 1 else ''})"


@dataclass(frozen=True)
class Comparison(JsonRecord):
    """Teacher against student on the same device: the ratios and one honest sentence."""

    teacher: InferenceMeasurement
    student: InferenceMeasurement
    speedup_batch1: float      # teacher latency / student latency (> 1: the student is faster)
    speedup_throughput: float  # student images/s / teacher images/s
    noisy: bool
    line: str


@dataclass(frozen=True)
class BlockInference(JsonRecord):
    """One block: the teacher's members against the student block, on the block's real input."""

    index: int
    name: str
    in_shape: tuple[int, ...]
    comparison: Comparison


@dataclass(frozen=True)
class InferenceReport(JsonRecord):
    """What a run reports about speed: the whole models and each replaced block."""

    models: Comparison
    blocks: tuple[BlockInference, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ExportResult(JsonRecord):
    """What ``export_run`` wrote and how closely the files reproduce the in-toolkit models."""

    run_dir: str
    export_dir: str
    files: dict[str, str]           # file name -> path
    model_json: str
    max_abs_diff: dict[str, float]  # file name -> largest |exported - in-toolkit| logit on the test split
    line: str                       # the teacher/student speed sentence


# ----------------------------------------------------------------------- the choice of students


KL = "kl"  # summed KL(teacher || teacher with the option), nats per image
SIZES = ("params", "macs")


def latency_key(batch: int | str, of: str = "") -> str:
    """The key of milliseconds per batch of ``batch`` images in a cost mapping: ``latency_ms@64``;
    ``of`` names a reference model timed beside it (``teacher``, ``teacher_int8``)."""
    return f"{of + '_' if of else ''}latency_ms@{batch}"


def latency_batch(key: str) -> int | None:
    """The batch size of a latency key of the option itself (``latency_ms@64`` -> 64), else None."""
    name, _, batch = key.partition("@")
    return int(batch) if name == "latency_ms" and batch.isdigit() else None


def kl_key(stage: str) -> str:
    """The key of the whole student's KL measured at ``stage`` (``kl_recalibrated``)."""
    return f"{KL}_{stage}"


@dataclass(frozen=True)
class CostVector:
    """What one option (or a whole model) costs, as the exact choice sums it per block: its KL, its
    milliseconds per batch at each batch size, its parameters and MACs. ``values`` is the flat
    mapping the solver and ``report.json`` use (``kl``, ``latency_ms@<batch>``, ``params``,
    ``macs``); the key names are defined here and nowhere else."""

    kl: float
    latency_ms: dict[int, float]
    params: float
    macs: float

    def values(self) -> dict[str, float]:
        return {KL: self.kl, **{latency_key(b): v for b, v in self.latency_ms.items()}, "params": float(self.params),
                "macs": float(self.macs)}

    @classmethod
    def from_values(cls, values: dict[str, float]) -> CostVector:
        latency = {b: v for k, v in values.items() if (b := latency_batch(k)) is not None}
        return cls(values.get(KL, 0.0), latency, values.get("params", 0.0), values.get("macs", 0.0))


@dataclass(frozen=True)
class OptionRecord:
    """One option for one block (the teacher's own block, or a trained candidate): what it costs,
    measured alone in deploy form, and what swapping it in alone costs in quality."""

    block: int
    name: str                       # "teacher" or the candidate's name
    unit: int | None                # the trained unit (None for the teacher's block)
    kl: float                       # KL(teacher || teacher with only this option), nats per image
    swapped_val_acc: float | None
    latency_ms: dict[str, float]    # batch size -> milliseconds
    params: int
    macs: int
    chosen: bool
    precision: str = "fp32"         # fp32, or int8 (ONNX Runtime static quantization, QDQ)

    @property
    def label(self) -> str:
        """The option as the choice names it: ``teacher``, ``separable-d1``, ``teacher-int8``..."""
        return self.name if self.precision == "fp32" else f"{self.name}-{self.precision}"


@dataclass(frozen=True)
class FrontPointRecord:
    """A point of the quality/cost trade-off: the best choice under one budget."""

    fraction: float                 # the budget, as a fraction of the teacher's cost
    names: list[str]                # option per block
    totals: dict[str, float]        # predicted sums (the whole model for costs)


@dataclass(frozen=True)
class SelectionRecord:
    """How the student's blocks were chosen (``select.method: budget``), and how far the additive
    model (sums of blocks measured alone) was from the assembled student measured whole."""

    objective: str
    metric: str
    budget: float
    budget_unit: str
    limits: dict[str, float]        # the sums the choice had to stay within
    layouts: dict[str, str]         # batch size -> memory layout every latency was measured in
    teacher: dict[str, float]       # the whole teacher's costs (kl 0)
    rest: dict[str, float]          # the teacher's cost outside its blocks (stem, pooling, classifier)
    options: list[OptionRecord]
    chosen: list[str]               # per block
    predicted: dict[str, float]     # the chosen student's sums: whole-model costs, summed kl
    optimal: bool                   # proven optimal by the solver
    front: list[FrontPointRecord]
    measured: dict[str, float] = field(default_factory=dict)  # the assembled student, measured whole
    measure_s: float = 0.0          # seconds spent measuring the options
    runtime: str = "torch"          # where options and the assembled student were timed (select.runtime)
    precisions: list[str] = field(default_factory=lambda: ["fp32"])  # precisions every option was offered in
    front_fp32: list[FrontPointRecord] = field(default_factory=list)  # the front without int8 options (if offered)


# ----------------------------------------------------------------------- the job


@dataclass(frozen=True)
class JobRecord(JsonRecord):
    """Everything a finished job reports; ``report.json`` is ``to_json`` of it."""

    status: str
    finished_at: str
    run_dir: str
    world_size: int
    config: Config  # the job's whole config, as run (report.json holds it as a mapping)
    teacher: dict[str, Any]           # where the teacher came from (``teacher.get_teacher``)
    cost_model: str                   # measured | macs
    member_share: dict[str, float]    # team size -> busiest member's share of one rank's time
    teacher_cache: CacheReport | None
    plan: Plan
    blocks: list[BlockRecord]
    ranks: list[RankRecord]
    distill: DistillTimes
    accepted_blocks: list[int]
    accuracy: Accuracy
    models: ModelSizes
    finetune: list[FinetuneEpoch]
    energy: Energy
    phases_s: dict[str, float]
    wall_s: float
    inference: InferenceReport | None = None  # deploy-form speed (``deploy.measure_models``), if measured
    export: ExportResult | None = None        # the standalone files (``export.export_run``), if exported
    selection: SelectionRecord | None = None  # the budgeted choice of blocks (``choose``), if made
    inputs: dict[str, float] | None = None    # what the cost model measured of the input pipeline and
                                              # the teacher cache's copies (``input_costs.InputCosts``)

    def block(self, index: int) -> BlockRecord:
        return next(b for b in self.blocks if b.index == index)
