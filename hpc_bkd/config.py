"""Job configuration: readable YAML files, one dataclass per section, strict validation.

Every key a user can write is a dataclass field below, with its meaning in the field's comment;
``hpc-bkd config-keys`` prints them all. Unknown keys and bad values are rejected with the list of
valid ones, because a typo in a cluster job config should fail in a second, not after an hour.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from hpc_bkd.blocks.candidates import Candidate, CandidateError, paper_candidate, parse_candidates
from hpc_bkd.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file or override is invalid; the message says how to fix it."""


TRACKERS = ("tensorboard", "mlflow")  # run.tracking's names: the backends of job.tracking (checked there)


@dataclass
class ModelConfig:
    # Teacher architecture: vgg11|vgg13|vgg16|vgg19 (CIFAR-style, with BN), resnet18|resnet34|resnet50
    # (CIFAR stem), "torchvision:<name>" for an unmodified torchvision.models constructor or model class
    # (torchvision:VisionTransformer with model.kwargs), or "timm:<name>" (needs the timm extra).
    arch: str = "vgg16"
    # Channel-width multiplier of our CIFAR-style teachers (1.0 = the paper's widths).
    width: float = 1.0
    # Keyword arguments for a "torchvision:<name>" or "timm:<name>" constructor, as a YAML mapping of
    # plain values (numbers, strings, booleans, null, lists of them), e.g. {image_size: 32} so a ViT
    # takes 32x32 inputs; one entry from the command line: --set model.kwargs.image_size=32.
    # num_classes and weights are set by the toolkit. {} = the constructor's defaults.
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    # digits (scikit-learn's bundled 8x8 digits, upscaled; offline), cifar10, cifar100, imagefolder,
    # or the name of a source registered with hpc_bkd.data.sources.register_source (checked when
    # the data is loaded, before anything is written).
    dataset: str = "digits"
    # Directory of the dataset (cifar*: the folder holding cifar-10-batches-py/; imagefolder: the
    # folder holding train/ and val/ (or test/) with one sub-folder per class). Unused for digits.
    root: str | None = None
    # Side of the square images fed to the network.
    image_size: int = 32
    # Mini-batch size for teacher training, distillation and fine-tuning.
    batch_size: int = 64
    # Batch size for evaluation passes.
    eval_batch_size: int = 256
    # Fraction of the training set held out for validation (block acceptance, early stopping).
    val_fraction: float = 0.1
    # Use at most this many training images (null = all); handy for smoke tests.
    train_limit: int | None = None
    # Training-batch augmentation, seeded by epoch and step (never by rank): none, crop (random
    # 4-pixel shifts; for digits and text), crop-flip (shifts + horizontal flips; CIFAR, photos).
    augment: Literal["none", "crop", "crop-flip"] = "none"
    # Where images live. memory: decoded once into RAM as uint8 (every rank holds all of them; no
    # worker processes). stream: an ImageFolder read from disk batch by batch by data.workers
    # processes per rank (ImageNet-scale data; a rank's memory does not grow with the dataset).
    # auto: memory for digits and CIFAR, and for an ImageFolder whose decoded images fit
    # data.memory_limit_gb; stream otherwise.
    storage: Literal["memory", "stream", "auto"] = "auto"
    # storage auto: the most GiB of decoded images (N x 3 x image_size^2 bytes) held in memory per rank.
    memory_limit_gb: float = 4.0
    # Streaming (and decoding an ImageFolder into memory): DataLoader worker processes per rank,
    # started by forkserver, never forked from the MPI rank (0 = decode in the rank itself, no prefetch).
    workers: int = 2
    # Streaming: batches each worker decodes ahead of the one being trained on.
    prefetch: int = 4
    # A file that cannot be decoded (truncated, not an image): error stops with its name; skip logs
    # it once, counts it in the report, and lets the next readable image of the split take its place.
    on_bad_image: Literal["error", "skip"] = "error"
    # ImageFolder listing: follow symbolic links to folders (false: a linked folder is left out and
    # logged, so `ln -s .. train/cat/loop` cannot pull other classes in or loop). With true, each
    # real folder is walked once (a link back to one already walked is an error naming both paths).
    follow_symlinks: bool = False
    # ImageFolder geometry: the shorter side is resized to image_size / crop_fraction and the centre
    # image_size x image_size kept (1.0: the whole shorter side; 0.875: ImageNet's 256 -> 224).
    # Streaming with augment crop / crop-flip trains on random-resized crops (+ flips) instead,
    # drawn per image from (seed, epoch, image index).
    crop_fraction: float = 1.0
    # Input normalisation: dataset (mean and std of the training images; of 1,000 of them when
    # streaming) or imagenet (torchvision's ImageNet constants: for teachers trained with them).
    normalization: Literal["dataset", "imagenet"] = "dataset"


@dataclass
class TeacherConfig:
    # Path to a user checkpoint (a state_dict saved with torch.save); null = train one and cache it.
    checkpoint: str | None = None
    # Epochs when the toolkit trains the teacher itself.
    epochs: int = 10
    # SGD learning rate (cosine schedule, momentum 0.9) for teacher training.
    lr: float = 0.05
    # L2 weight decay for teacher training.
    weight_decay: float = 5e-4
    # Cache the trained teacher under the run directory and reuse it when the config matches.
    cache: bool = True


@dataclass
class BlocksConfig:
    # conv: every 3x3 Conv2d, dense or grouped but not depthwise (+ the BatchNorm2d after it), as in
    # the paper. unit: every repeated unit of the network (a module held in an nn.Sequential or
    # nn.ModuleList stage that runs once, taking and returning one tensor: ResNet/ResNeXt/RegNet
    # blocks, inverted residuals, MBConv, ShuffleNet units, ConvNeXt/Swin/ViT blocks), or one VGG
    # stage (convs between two poolings) where a network has no such units.
    granularity: Literal["conv", "unit"] = "conv"
    # Depthwise-separable layers (3x3 depthwise + 1x1 pointwise + BN) stacked per student block.
    student_depth: int = 2
    # Hidden width of a student block as a multiple of the teacher block's output channels.
    student_width: float = 1.0
    # Candidate students trained for every block (each (block, candidate) pair is a unit of
    # distillation work, planned, checkpointed and resumed like a block): separable-d<depth>[-w<width>]
    # (the paper's depthwise-separable layers), lowrank-r<fraction> (3x3 conv to that fraction of the
    # output channels, then 1x1 back), skip (the block removed: identity, or a strided 1x1 conv + BN /
    # a linear map where its shape changes), shrink-w<fraction> (unit granularity: the teacher's unit
    # with its internal widths cut to that fraction, from its weights; needs the prune extra). A kind
    # that does not fit a block (separable on tokens) is left out for it and logged once.
    # Keeping the teacher's block is always an option of select.method budget.
    # [] = one candidate, separable-d<student_depth>-w<student_width>.
    candidates: list[str] = field(default_factory=list)


@dataclass
class DistillConfig:
    # Epochs over the training set for each student block.
    epochs: int = 4
    # rmsprop (the paper's), sgd or adam; each block has its own optimizer.
    optimizer: Literal["rmsprop", "sgd", "adam"] = "rmsprop"
    # Initial learning rate of each block's optimizer.
    lr: float = 1e-3
    # Multiply the learning rate by this after every epoch (exponential decay).
    lr_decay: float = 0.8
    # L2 weight decay of the student blocks.
    weight_decay: float = 0.0
    # output: MSE to the teacher block's output (the paper). activation: where the teacher applies
    # a ReLU right after the block, MSE between ReLU(student) and ReLU(target), i.e. only what the
    # rest of the network sees (blocks without a ReLU after them always use output).
    match: Literal["output", "activation"] = "output"
    # Ghost batch normalisation: student BatchNorms normalise each of this many equal slices of a
    # batch on its own (1 = the whole batch). A data-parallel team of up to this many ranks then
    # needs no BatchNorm communication (each member holds whole slices) and results stay the same
    # on one rank or many; with 1, team members sync statistics at every BatchNorm (slower).
    bn_groups: int = 1
    # A block is accepted when the teacher with only this block swapped in keeps accuracy within
    # this many percentage points of the teacher's own validation accuracy.
    accept_tolerance: float = 1.0
    # Stop a block early once its swapped accuracy is within this many points (null = never).
    early_stop_tolerance: float | None = None
    # Validate (swapped accuracy) after every epoch and keep the best weights.
    validate_every_epoch: bool = True
    # Seconds between periodic checkpoints of unfinished blocks (also saved after each epoch).
    checkpoint_interval_s: float = 60.0
    # parallel: blocks trained concurrently, one teacher pass per batch shared by all blocks of a
    # rank (this toolkit). sequential: the paper's schedule, one block at a time, each re-running
    # the teacher prefix for its own epochs (a baseline for benchmarks).
    schedule: Literal["parallel", "sequential"] = "parallel"
    # Teacher-activation cache. auto: each rank runs the frozen teacher over the training set once
    # and keeps its blocks' inputs and targets in memory, so later epochs run no teacher at all
    # (used when data.augment is none, the schedule is parallel and the cache of every block fits
    # the budget below; the log says which). off: re-run the teacher prefix on every batch.
    teacher_cache: Literal["auto", "off"] = "auto"
    # Memory the cache may use per rank, in GiB (null = half the memory available at start, split
    # between the ranks of a node; on a GPU, 40 % of its free memory).
    teacher_cache_gb: float | None = None
    # How the members of a data-parallel team sum gradients and exchange rows. auto: nccl between
    # GPU ranks (device to device, bootstrapped from MPI), mpi between CPU ranks. mpi: MPI
    # allreduce (GPU tensors staged through host memory). nccl: NCCL (GPU ranks only). gloo:
    # torch.distributed's Gloo, CPU or GPU (the same bootstrap as nccl).
    team_backend: Literal["auto", "mpi", "nccl", "gloo"] = "auto"


@dataclass
class PlanConfig:
    # measured: time teacher-forward and student-step per block on this device before planning, on
    # every rank at once (rank 0 plans with the median; with hybrid, a team member's rows too).
    # macs: estimate from multiply-accumulate counts (no measurement).
    cost_model: Literal["measured", "macs"] = "measured"
    # Batches timed per unit when cost_model is measured (after one warm-up batch): at most this
    # many, and fewer when timing them would take more than plan.measure_share of the distillation.
    measure_batches: int = 5
    # The most of the distillation's predicted time the cost measurement may take (each timed batch
    # steps every unit once per team size; distillation steps each unit epochs x steps times,
    # spread over the ranks). At least one batch is timed after the warm-up whatever this says.
    measure_share: float = 0.05
    # exact: branch-and-bound optimum; lpt: longest-processing-time + local search; auto: exact for
    # small problems, else lpt.
    method: Literal["auto", "exact", "lpt"] = "auto"
    # Let a group of blocks be trained data-parallel by several ranks when that beats a pure block
    # split (more ranks than useful, or a dominant rank).
    hybrid: bool = True
    # Force this many data-parallel teams (1 = every rank trains every block on its slice of each
    # batch; null = let the planner choose; ignored unless hybrid is true).
    teams: int | None = None


@dataclass
class SelectConfig:
    # Which student block replaces each teacher block. tolerance: the paper's rule, for one
    # candidate: a block's student is kept when its swapped validation accuracy is within
    # distill.accept_tolerance of the teacher's. budget: per block the teacher's own block or one
    # candidate, chosen exactly (a mixed-integer program) for select.objective under select.budget.
    method: Literal["tolerance", "budget"] = "tolerance"
    # quality: minimise the summed quality loss (per block, the KL divergence of the teacher's
    # logits from those of the teacher with only that block swapped, on the validation split)
    # with select.metric within select.budget. cost: the fastest (smallest) student whose summed
    # quality loss is within select.budget (nats per image): the least largest fraction of the
    # teacher's select.metric over select.latency_batches, so never slower than the teacher at any.
    objective: Literal["quality", "cost"] = "quality"
    # latency: the deploy-form latency of the whole model at every batch size of
    # select.latency_batches, predicted as the teacher's minus its replaced blocks plus the chosen
    # ones, each measured alone on this device; params; macs (multiply-accumulates per image).
    metric: Literal["latency", "params", "macs"] = "latency"
    # With objective quality, the most the student may cost: a fraction of the teacher's
    # (budget_unit fraction) or an absolute value (milliseconds per batch, parameters or MACs).
    # With objective cost: the summed quality loss allowed.
    budget: float = 0.8
    # fraction (of the teacher's cost) or absolute; see select.budget.
    budget_unit: Literal["fraction", "absolute"] = "fraction"
    # Batch sizes latency is measured and budgeted at; the student must meet the budget at each.
    latency_batches: list[int] = field(default_factory=lambda: [1, 64])
    # Where select.method budget times every option and the assembled student: torch (PyTorch
    # eager, deploy form), onnxruntime (each option exported to ONNX and run in ONNX Runtime on the
    # CPU, run.threads threads: the runtime a deployer ships), or auto (onnxruntime when the export
    # extra is installed and the job runs on the CPU, else torch; the log says which).
    runtime: Literal["auto", "torch", "onnxruntime"] = "auto"
    # Precisions every option is offered in: fp32, and int8 (ONNX Runtime static quantization,
    # QDQ with per-channel weights, calibrated on the block's real inputs; needs the onnxruntime
    # runtime). With int8 each block chooses among {teacher, teacher-int8, candidate, candidate-int8}.
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    # How int8 activation ranges are calibrated: minmax, entropy or percentile (ONNX Runtime's
    # calibration methods).
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    # Training images (teacher prefix outputs, per block) int8 calibration runs on.
    calibration_images: int = 256


@dataclass
class FinetuneConfig:
    # Before fine-tuning, re-estimate the assembled student's BatchNorm statistics on this many
    # training batches (students see each other's outputs now, not the teacher's; 0 = skip).
    recalibrate_bn_batches: int = 20
    # End-to-end fine-tuning of the assembled student (0 = skip).
    epochs: int = 3
    # SGD (Nesterov momentum 0.9, cosine schedule) learning rate for fine-tuning.
    lr: float = 0.01
    # Loss = alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * cross-entropy.
    alpha: float = 0.7
    # Softmax temperature T of the distillation term.
    temperature: float = 4.0
    # Which epoch's weights to keep: last (the cosine schedule's end; robust when the validation
    # split is small) or best-val (highest validation accuracy; guards against a late collapse).
    keep: Literal["last", "best-val"] = "last"


@dataclass
class RunConfig:
    # Run directory (checkpoints, report, plots). Relative paths are relative to the current dir.
    dir: str = "runs/default"
    # Global seed; each block's seed derives from this and the block's index, never the rank.
    seed: int = 0
    # auto: one GPU per rank by node-local rank when CUDA is available, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads per rank (0 = an even share of this node's cores among its ranks).
    threads: int = 0
    # Seconds between progress lines per rank (a tqdm bar is shown instead on a terminal).
    log_interval_s: float = 10.0
    # With several ranks: a rank not heard from for this many seconds (its process died or its node
    # failed) is lost; the others save their blocks and exit (code 4) naming it, instead of waiting
    # until the time limit. Every rank sends a heartbeat from a thread of its own, so long work
    # (rank 0 training the teacher or fine-tuning) is not mistaken for a loss. 0 = never.
    peer_timeout_s: float = 300.0
    # Measure the teacher's and the student's inference speed (and each replaced block's) in deploy
    # form (BatchNorm folded, the faster memory layout) at the end of a run, on the run's device.
    measure_inference: bool = True
    # Export the student at the end of a run into <run.dir>/export/ (as `hpc-bkd export` does).
    export: bool = True
    # Formats of that export: pt2 (torch.export program), onnx (checked with ONNX Runtime; needs the
    # export extra: pip install -e '.[export]').
    export_formats: list[str] = field(default_factory=lambda: ["pt2", "onnx"])
    # Arithmetic of the teacher's forward and the students' train steps: fp32, bf16 (autocast), or
    # fp16 (autocast with a gradient scaler). Weights, optimizer state, checkpoints and exports stay fp32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Experiment trackers rank 0 hands the finished job to: tensorboard (event files under
    # <run.dir>/tensorboard/), mlflow (one run per job). Needs the tracking extra: pip install -e
    # '.[tracking]'. A tracker that is missing or cannot be reached is a warning; the job goes on.
    tracking: list[str] = field(default_factory=list)
    # MLflow tracking URI: a server (http://host:5000) or a local store (file:/path, sqlite:///path.db);
    # null = $MLFLOW_TRACKING_URI, else file:<run.dir>/mlruns.
    mlflow_uri: str | None = None
    # MLflow experiment the job's run is filed under (created when missing).
    mlflow_experiment: str = "hpc_bkd"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]
DEFAULT_CONFIG = "digits-vgg16"
EXPORT_FORMATS = ("pt2", "onnx")


def shipped_configs() -> dict[str, Path]:
    """Configs shipped inside the package, by name (file stem)."""
    root = importlib.resources.files("hpc_bkd") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config_path(name_or_path: str | None) -> Path:
    """A path to a YAML file, or the name of a shipped config (``vgg16-cifar10``)."""
    name_or_path = name_or_path or DEFAULT_CONFIG
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ConfigError(
        f"config {name_or_path!r} is neither a file nor a shipped config; "
        f"shipped configs: {', '.join(sorted(shipped))}"
    )


def _coerce(section: str, key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against the field's type hint; convert ints to floats where expected."""
    where = f"{section}.{key}"
    origin, args = get_origin(hint), get_args(hint)
    if origin is dict:
        return _coerce_mapping(where, value)
    if origin is list:  # a YAML list, or "a,b" from --set
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, int) and not isinstance(items, bool):  # `--set key=1`: a list of one
            items = [items]
        if not isinstance(items, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args == (int,):
            items = [int(v) if isinstance(v, str) and v.strip().isdigit() else v for v in items]
            return [_coerce(section, key, int, v) for v in items]
        if not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return [v.strip() for v in items if v.strip()]
    if origin is Literal:
        if isinstance(value, bool) and "off" in args:  # YAML reads an unquoted off (and on) as a bool
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not valid; choose one of {', '.join(map(str, args))}")
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(section, key, inner, value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        whole: Any = _number(value) if isinstance(value, str) else value  # 1e3 from --set: 1000
        if isinstance(whole, float) and isinstance(value, str) and whole.is_integer():
            whole = int(whole)
        if isinstance(whole, bool) or not isinstance(whole, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return whole
    if hint is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(number)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {where}")  # a bug in this module


# YAML 1.1 (PyYAML) reads 1e9 and 1E-3 as strings: it wants a dot (1.0e9) and a signed exponent
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number(value: Any) -> int | float | None:
    """``value`` as a number: an int or float, or exponent notation YAML left as a string (1e9)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)
    return None
_PLAIN = (int, float, str, bool, type(None))


def _coerce_mapping(where: str, value: Any) -> dict[str, Any]:
    """A mapping of identifiers to plain YAML values (what a constructor's keyword arguments take)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping (key: value), got {value!r}")
    for k, v in value.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise ConfigError(f"{where}: key {k!r} is not a keyword argument name")
        items = v if isinstance(v, list) else [v]
        if not all(isinstance(i, _PLAIN) for i in items):
            raise ConfigError(f"{where}.{k}: expected a number, string, boolean, null or a list of them, got {v!r}")
    return dict(value)


def _check_model(cfg: Config) -> None:
    """model.kwargs only for constructors that take them, never the keys the toolkit sets itself."""
    m = cfg.model
    if m.kwargs and not m.arch.startswith(("torchvision:", "timm:")):
        raise ConfigError(f"model.kwargs: only for model.arch torchvision:<name> or timm:<name>, not {m.arch!r}")
    reserved = sorted(set(m.kwargs) & {"num_classes", "weights", "pretrained"})
    if reserved:
        raise ConfigError(f"model.kwargs: {', '.join(reserved)} set by the toolkit (the dataset's classes, no "
                          "downloaded weights; a teacher comes from training or teacher.checkpoint)")


def _check_ranges(cfg: Config) -> None:
    positive = {
        "data.image_size": cfg.data.image_size, "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size, "blocks.student_depth": cfg.blocks.student_depth,
        "blocks.student_width": cfg.blocks.student_width, "distill.lr": cfg.distill.lr,
        "model.width": cfg.model.width, "plan.measure_batches": cfg.plan.measure_batches,
        "plan.measure_share": cfg.plan.measure_share,
        "distill.epochs": cfg.distill.epochs, "distill.bn_groups": cfg.distill.bn_groups,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    for key, value in {"teacher.epochs": cfg.teacher.epochs, "finetune.epochs": cfg.finetune.epochs,
                       "finetune.recalibrate_bn_batches": cfg.finetune.recalibrate_bn_batches,
                       "run.threads": cfg.run.threads, "run.peer_timeout_s": cfg.run.peer_timeout_s}.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if cfg.distill.teacher_cache_gb is not None and cfg.distill.teacher_cache_gb < 0:
        raise ConfigError(f"distill.teacher_cache_gb: must be >= 0 or null, got {cfg.distill.teacher_cache_gb}")
    if cfg.data.train_limit is not None and cfg.data.train_limit < 1:
        raise ConfigError(f"data.train_limit: must be >= 1, or null for every image, got {cfg.data.train_limit}")
    if cfg.plan.teams is not None and cfg.plan.teams < 1:
        raise ConfigError(f"plan.teams: must be >= 1 or null, got {cfg.plan.teams}")
    if cfg.distill.bn_groups > cfg.data.batch_size // 2:
        raise ConfigError(f"distill.bn_groups: at most data.batch_size / 2 = {cfg.data.batch_size // 2} "
                          f"(BatchNorm needs two images per group), got {cfg.distill.bn_groups}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")
    if not 0.0 < cfg.distill.lr_decay <= 1.0:
        raise ConfigError(f"distill.lr_decay: must be in (0, 1], got {cfg.distill.lr_decay}")
    trackers = sorted(set(cfg.run.tracking) - set(TRACKERS))
    if trackers:
        raise ConfigError(f"run.tracking: unknown {', '.join(trackers)}; valid: {', '.join(TRACKERS)}")
    unknown = sorted(set(cfg.run.export_formats) - set(EXPORT_FORMATS))
    if unknown:
        raise ConfigError(f"run.export_formats: unknown {', '.join(unknown)}; valid: {', '.join(EXPORT_FORMATS)}")
    _check_select(cfg)
    _check_model(cfg)


def _check_select(cfg: Config) -> None:
    """Candidates parse, and the selection can be made with them."""
    try:
        candidates = job_candidates(cfg)
    except CandidateError as exc:
        raise ConfigError(f"blocks.candidates: {exc}") from None
    s = cfg.select
    if s.method == "tolerance" and len(candidates) > 1:
        raise ConfigError(f"select.method tolerance (the paper's rule) takes one candidate; blocks.candidates "
                          f"lists {len(candidates)}: use select.method budget to choose among them")
    if not s.latency_batches or any(b <= 0 for b in s.latency_batches):
        raise ConfigError(f"select.latency_batches: positive batch sizes, got {s.latency_batches}")
    if s.budget < 0:
        raise ConfigError(f"select.budget: must be >= 0, got {s.budget}")
    if not s.precisions or "fp32" not in s.precisions or set(s.precisions) - {"fp32", "int8"}:
        raise ConfigError(f"select.precisions: fp32 and optionally int8, got {s.precisions}")
    if "int8" in s.precisions and s.runtime == "torch":
        raise ConfigError("select.precisions int8 needs select.runtime onnxruntime (or auto): int8 options are "
                          "ONNX Runtime static quantization")
    if s.calibration_images < 1:
        raise ConfigError(f"select.calibration_images: must be >= 1, got {s.calibration_images}")
    if s.objective == "cost" and s.budget_unit == "fraction":
        raise ConfigError("select.budget_unit: objective cost budgets the summed quality loss (KL, nats per "
                          "image; the teacher's is 0), which is absolute: set select.budget_unit absolute")


def job_candidates(cfg: Config) -> list[Candidate]:
    """The job's candidate students: blocks.candidates, or the paper's one from student_depth/width."""
    b = cfg.blocks
    return parse_candidates(b.candidates) if b.candidates else [paper_candidate(b.student_depth, b.student_width)]


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated Config from a nested dict, rejecting unknown sections and keys."""
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a mapping of sections (model, data, ...)")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}")
    cfg = Config()
    for section, values in raw.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping of keys, got {values!r}")
        obj = getattr(cfg, section)
        hints = get_type_hints(type(obj))
        valid = [f.name for f in fields(obj)]
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown key {section}.{key}; valid keys in {section}: {', '.join(valid)}")
            setattr(obj, key, _coerce(section, key, hints[key], value))
    _check_ranges(cfg)
    return cfg


def config_from_saved(raw: Any) -> Config:
    """The config a run saved (config.json, a checkpoint's copy): keys this version does not know
    (a run of another version) are dropped rather than refused."""
    if not isinstance(raw, dict):
        raise ConfigError("a saved config must be a mapping of sections")
    known = Config().to_dict()
    return config_from_dict({s: {k: v for k, v in (vals or {}).items() if k in known[s]}
                             for s, vals in raw.items() if s in known and isinstance(vals, dict)})


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` with a YAML-typed value (``distill.epochs=2``, ``teacher.checkpoint=null``)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. distill.epochs=2")
    dotted, value = text.split("=", 1)
    section, key = dotted.split(".", 1)
    return section, key, yaml.safe_load(value) if value != "" else ""


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file (or shipped config name) and apply ``section.key=value`` overrides."""
    path = resolve_config_path(name_or_path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for text in overrides or []:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raw[section] = {}
        *outer, last = key.split(".")  # model.kwargs.image_size=32: one entry of a mapping key
        target = raw[section]
        for part in outer:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[last] = value
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _read_yaml(path: Path) -> Any:
    """The parsed YAML of a config file; an unreadable, binary or empty file is a ``ConfigError``
    naming it (an empty file would otherwise run the built-in defaults: a full-size job)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file: byte {exc.start} is not UTF-8; "
                          "is this the config you meant?") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text YAML file (it holds NUL bytes); is this the config you meant?")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty (no sections); write the sections to change "
                          f"(see `hpc-bkd config-keys`), or use `-c {DEFAULT_CONFIG}` for the defaults")
    return raw


def _field_comments(cls: type) -> dict[str, list[str]]:
    """The ``# ...`` lines written above each field in this module: the keys' documentation."""
    docs: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("# "))
        elif ":" in text and not text.startswith(("def ", "@", '"')):
            docs[text.split(":", 1)[0]] = pending
            pending = []
    return docs


def describe_keys() -> str:
    """Every section and key with its default and documentation, as commented YAML."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        comments = _field_comments(cls)
        defaults = cls()
        for f in fields(cls):
            lines += [f"  # {c}" for c in comments.get(f.name, [])]
            value = yaml.safe_dump(getattr(defaults, f.name), default_flow_style=True).splitlines()[0]
            lines.append(f"  {f.name}: {value}")
    return "\n".join(lines)
