"""Hostile inputs (issue 24): whatever a user types or leaves in a folder, the job says what is
wrong (exit 2, the file named, no traceback) or runs correctly, and no earlier result changes.

One finished tiny run is shared by the module; each case that could touch it compares checksums
of every file in it before and after. Cases that need no job run in-process.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import hpc

from hpc_bkd.blocks.candidates import Candidate, job_units
from hpc_bkd.config import ConfigError, DataConfig, load_config
from hpc_bkd.data.batches import DataError
from hpc_bkd.data.listing import list_images
from hpc_bkd.data.sources import load_data
from hpc_bkd.distill.distiller import step_schedule
from hpc_bkd.distributed.runtime import Interrupted, clear_stop, request_stop
from hpc_bkd.store import atomic_io
from hpc_bkd.store.lock import run_dir_lock
from hpc_bkd.store.rundir import RunDir, UnitShape, block_identity

TINY = ["-c", "tiny", "--set", "run.threads=1"]


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (files moved aside excluded)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".damaged-" not in p.name}


def refused(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run whose teacher was trained (and cached) in its own directory."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    hpc("run", *TINY, "--run-dir", str(run))
    assert (run / "student.pt").is_file() and (run / "teacher.pt").is_file()
    assert (run / "job.lock").read_bytes() == b""  # released, and emptied
    return run


# ------------------------------------------------------------------------------ the run directory


def test_a_different_job_is_refused_before_it_writes_anything(finished: Path):
    """Issue item 3: the refused job used to train and write a new teacher.pt and config.json first."""
    before = digest(finished)
    proc = hpc("run", *TINY, "--run-dir", str(finished), "--set", "model.width=0.25", check=False)
    refused(proc, f"{finished} holds blocks of a different job", "model.width: 0.125 -> 0.25", "Nothing was written")
    assert digest(finished) == before


def test_a_second_job_on_a_locked_directory_exits_at_once_naming_the_holder(finished: Path):
    """Issue item 4: this process holds the lock (a real flock, as a running job does); the CLI in
    another process is refused, naming host, PID and start time, and changes nothing."""
    before = digest(finished)
    with run_dir_lock(finished) as lock:
        holder = lock.read_text()
        proc = hpc("run", *TINY, "--run-dir", str(finished), "--set", "distill.lr=0.01", check=False)
    refused(proc, f"{finished} is in use by another job", f"PID {os.getpid()}", "started 20", str(lock))
    assert str(os.getpid()) in holder
    assert digest(finished) == before  # the lock file is emptied again on release


def test_a_block_file_copied_over_another_is_retrained(finished: Path, tmp_path: Path):
    """Issue item 2: block 5 copied over block 6 (same shapes) and over block 2 (other shapes).
    Both are named, moved aside and trained again; every other block stays as it was."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    blocks = run / "blocks"
    for target in (2, 6):
        shutil.copy(blocks / "block-005-separable-d1.pt", blocks / f"block-00{target}-separable-d1.pt")
    keep = {k: v for k, v in digest(run).items() if k.startswith("blocks/") and k[13:16] not in ("002", "006")}
    assert len(keep) == 6
    proc = hpc("run", *TINY, "--run-dir", str(run))
    for target, name in ((2, "features.8"), (6, "features.22")):
        path = blocks / f"block-00{target}-separable-d1.pt"
        assert f"{path} is damaged or unreadable (it holds block 5 (features.18" in proc.stderr
        assert f"not block {target} ({name}, candidate separable-d1)" in proc.stderr
        assert len(list(blocks.glob(f"{path.name}.damaged-*"))) == 1
        assert atomic_io.load(path)["metrics"]["index"] == target
    assert "6 unit(s) already finished" in proc.stderr and "Traceback" not in proc.stderr
    assert {k: v for k, v in digest(run).items() if k in keep} == keep


def test_block_records_are_checked_by_shape_and_checksum(tmp_path: Path):
    """In-process: a record whose weights changed in place (checksum), or whose tensors do not fit
    the unit's student (shapes), is moved aside; a record of an older version (no checksum) is kept."""
    run = RunDir(tmp_path)
    units = job_units(3, [Candidate.parse("separable-d1")])
    shape = UnitShape("b", {"w": (2,)})
    for u in units:
        state = {"w": torch.full((2,), float(u.id))}
        record = {"fingerprint": "fp", "state_dict": state, "metrics": {"index": u.block, "name": "b",
                                                                        "candidate": u.candidate}}
        run.save_block(u, {**record, **(block_identity(state) if u.id else {})})
    changed = atomic_io.load(run.block(units[1]))
    changed["state_dict"]["w"] += 1
    atomic_io.save(changed, run.block(units[1]))
    wrong = atomic_io.load(run.block(units[2]))
    wrong["state_dict"] = {"w": torch.ones(3)}
    wrong.update(block_identity(wrong["state_dict"]))
    atomic_io.save(wrong, run.block(units[2]))
    assert run.finished_units("fp", units, lambda u: shape) == [0]
    assert not run.block(units[1]).exists() and not run.block(units[2]).exists()
    assert len(list(tmp_path.glob("blocks/*.damaged-*"))) == 2


# ------------------------------------------------------------------------------ sizes and splits


def test_a_split_smaller_than_a_batch_is_named(tmp_path: Path):
    """Issue item 5: was a ZeroDivisionError in the cost measurement."""
    proc = hpc("run", *TINY, "--run-dir", str(tmp_path / "run"), "--set", "data.train_limit=60", check=False)
    refused(proc, "54 training images after the validation split", "fewer than one batch of data.batch_size=64",
            "set data.batch_size to at most 54")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["job.lock"]


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path: Path):
    """Issue item 7: model.width=200 used to allocate 12.5 GB, then die with a traceback."""
    proc = hpc("run", *TINY, "--run-dir", str(tmp_path / "run"), "--set", "model.width=200", check=False)
    refused(proc, "model.width=200", "training needs at least", "368,642,470,410 parameters", "this rank has",
            "lower model.width")


def test_numbers_empty_and_binary_configs(tmp_path: Path):
    """Issue items 7 and 8, in-process: exponent notation is a number, train_limit 0 is not
    "all", an empty or binary config file is the config error it is, bad values are named."""
    assert load_config("tiny", ["model.width=1e9"]).model.width == 1e9
    assert load_config("tiny", ["data.train_limit=1e3"]).data.train_limit == 1000
    assert load_config("tiny", ["distill.lr=5E-4"]).distill.lr == 5e-4
    from hpc_bkd.job.limits import check_fits
    with pytest.raises(ConfigError, match="model.width=1e\\+09.*too large to build"):
        check_fits(load_config("tiny", ["model.width=1e9"]), torch.device("cpu"))
    cases = {"data.train_limit=0": "data.train_limit: must be >= 1", "data.train_limit=1.5e3x": "expected an integer",
             "model.width=.inf": "expected a finite number", "distill.epochs=1e-3": "expected an integer",
             "model.width=abc": "expected a number"}
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", [override])
    empty, binary, tagged = tmp_path / "empty.yaml", tmp_path / "binary.yaml", tmp_path / "tagged.yaml"
    empty.write_text("# nothing\n")
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe")
    tagged.write_text("model: !!python/object/apply:os.system ['true']\n")
    for path, message in ((empty, "the config file is empty"), (binary, "not a text (UTF-8) YAML file"),
                          (tagged, "not valid YAML")):
        with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
            load_config(str(path))


def test_an_empty_config_file_exits_2(tmp_path: Path):
    """Issue item 8: it used to run the built-in defaults (a full-width VGG16 for 10 epochs)."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    proc = hpc("run", "-c", str(empty), "--run-dir", str(tmp_path / "run"), check=False)
    refused(proc, f"config error: {empty}: the config file is empty")
    assert not (tmp_path / "run").exists()


def test_a_pickle_teacher_is_refused_without_the_unsafe_hint(tmp_path: Path):
    """Issue item 8: the refusal ended with PyTorch's advice to set weights_only=False."""
    from hpc_bkd.blocks.models import build_model
    from hpc_bkd.distill.teacher import TeacherMismatchError, load_teacher_checkpoint

    path = tmp_path / "evil.pt"
    torch.save({"x": _Pickled()}, path)
    with pytest.raises(TeacherMismatchError) as info:
        load_teacher_checkpoint(path, build_model("vgg11", 10, 0.125))
    text = str(info.value)
    assert str(path) in text and "holds Python objects, not only tensors" in text and "weights-only" in text
    assert "weights_only=False" not in text and "weights_only` set to `False" not in text


class _Pickled:
    def __reduce__(self):
        return (print, ("not run",))


def test_evaluate_and_export_of_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Issue item 8: they reported a missing student.pt and a `run` command without the job's -c."""
    from hpc_bkd.cli import main as cli

    missing = tmp_path / "nowhere"
    command = f"run `hpc-bkd run -c tiny --run-dir {missing} --set run.threads=1` first"
    proc = hpc("evaluate", *TINY, "--run-dir", str(missing), check=False)
    refused(proc, f"run directory {missing} not found", command)
    assert cli.main(["export", *TINY, "--run-dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"run directory {missing} not found" in err and command in err and err.count("\n") == 1
    (tmp_path / "started").mkdir()
    assert cli.main(["export", *TINY, "--run-dir", str(tmp_path / "started")]) == 2
    assert "student.pt not found: " in capsys.readouterr().err
    assert not missing.exists()


def test_no_lr_scheduler_warning_when_a_resumed_unit_closes_its_first_epoch():
    """Issue item 8: resumed at the end of epoch 1, the restored schedule steps before the optimizer."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.RMSprop(model.parameters())
    saved = torch.optim.lr_scheduler.ExponentialLR(opt, 0.8).state_dict()
    sched = torch.optim.lr_scheduler.ExponentialLR(torch.optim.RMSprop(model.parameters()), 0.8)
    sched.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_schedule(sched)
    assert sched.get_last_lr()[0] == pytest.approx(0.01 * 0.8)


# ------------------------------------------------------------------------------ hostile folders


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A small PNG ImageFolder: 3 classes x 8 train images, 2 val images each."""
    from PIL import Image

    root = tmp_path / "folder"
    for split, n in (("train", 8), ("val", 2)):
        for c in ("cat", "dog", "owl"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (40 * i, 80 if c == "dog" else 0, 0)).save(root / split / c / f"{i}.png")
    return root


def folder_cfg(root: Path, **kw: object) -> DataConfig:
    return DataConfig(**{"dataset": "imagefolder", "root": str(root), "image_size": 8, "storage": "memory",
                         "workers": 0, "val_fraction": 0.0, **kw})  # type: ignore[arg-type]


def test_a_symlink_loop_is_not_followed(folder: Path):
    """Issue item 1: `ln -s .. train/cat/loop` labelled every image "cat", ten times over; two such
    links grew memory without bound. Not followed by default; followed, each loop is an error."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    os.symlink("..", folder / "train" / "cat" / "loop")
    os.symlink("../../train", folder / "train" / "dog" / "up")
    data = load_data(folder_cfg(folder))
    assert len(data.train) == 24 and data.num_classes == 3
    assert torch.bincount(data.train.labels).tolist() == [8, 8, 8]
    with pytest.raises(DataError, match=r"folder .*/train/cat/loop/cat is the same folder as .*/train/cat \("):
        load_data(folder_cfg(folder, follow_symlinks=True))
    (folder / "train" / "cat" / "loop").unlink()
    (folder / "train" / "dog" / "up").unlink()
    os.symlink(folder / "train" / "owl", folder / "train" / "cat" / "birds")  # a link to a real folder
    samples, _ = list_images(folder / "train", IMG_EXTENSIONS)
    assert len(samples) == 24
    with pytest.raises(DataError, match=r"folder .*/train/owl is the same folder as .*/train/cat/birds"):
        load_data(folder_cfg(folder, follow_symlinks=True))


def test_a_file_reached_twice_is_named(folder: Path):
    os.symlink(folder / "train" / "dog" / "0.png", folder / "train" / "cat" / "copy.png")
    with pytest.raises(DataError, match=r"image .*/train/dog/0.png is the same file as .*/train/cat/copy.png"):
        load_data(folder_cfg(folder))


def test_listing_and_decoding_stop_on_request(folder: Path):
    """A stop request (SIGTERM, SIGINT) ends the listing and the decoding into memory promptly."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for i in range(300):
        (folder / "train" / "cat" / f"x{i}.txt").write_text("")
    request_stop()
    try:
        with pytest.raises(Interrupted, match="stopped while listing"):
            list_images(folder / "train", IMG_EXTENSIONS)
    finally:
        clear_stop()
    for i in range(300):
        (folder / "train" / "cat" / f"x{i}.txt").unlink()
    from hpc_bkd.data.batches import DataStats
    from hpc_bkd.data.sources import ImageFolder

    request_stop()
    try:
        with pytest.raises(Interrupted, match="stopped while decoding"):
            ImageFolder().load(folder_cfg(folder), None, DataStats())
    finally:
        clear_stop()


def test_an_empty_or_unreadable_image_is_named_and_skip_skips_it(folder: Path):
    """Issue item 6: a 0-byte file gave "buffer length (0)" from a DataLoader worker, no file named,
    and on_bad_image: skip did not skip it."""
    empty = folder / "train" / "dog" / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{empty}: the file is empty (0 bytes)")):
        load_data(folder_cfg(folder))
    data = load_data(folder_cfg(folder, on_bad_image="skip"))
    assert list(data.stats.bad_images) == [str(empty)] and len(data.train) == 25
    if os.geteuid() != 0:  # root reads any file
        locked = folder / "train" / "owl" / "0.png"
        locked.chmod(0)
        with pytest.raises(DataError, match=re.escape(f"{locked}: cannot decode image") + ".*cannot read"):
            load_data(folder_cfg(folder, on_bad_image="error"))
