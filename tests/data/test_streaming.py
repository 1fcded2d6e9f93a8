"""Streaming ImageFolders: decoding, the batch invariants hpc_bkd relies on, bad files, and the
same blocks as in-memory storage (data.storage: stream vs memory)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from hpc_bkd.config import DataConfig
from hpc_bkd.data import streaming
from hpc_bkd.data.batches import DataError, eval_batches, train_batch
from hpc_bkd.data.decode import BadImage, decode
from hpc_bkd.data.sources import load_data
from hpc_bkd.data.streaming import list_folder


def digits_folder(root: Path, **kw) -> Path:
    """``benchmarks.imagefolders.digits_folder`` (benchmarks/ is beside the package, not in it)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.imagefolders import digits_folder as make

    return make(root, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("digits-folder"))


def stream_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "imagefolder", "root": str(root), "image_size": 32, "storage": "stream",
                         "on_bad_image": "skip", **kw})


def test_layout_nested_folders_and_formats(folder):
    files, labels, classes = list_folder(folder / "train")
    names = [f.decode() for f in files]
    assert classes == [f"n{c:08d}" for c in range(10)] and len(names) == len(labels) == 301
    assert any("/nested/" in n for n in names)
    assert {Path(n).suffix for n in names} == {".JPEG", ".png", ".bmp"}


def test_decoders_gray_cmyk_bmp_and_truncated(folder):
    from PIL import Image

    modes = {}
    for path in sorted((folder / "train").rglob("*.*")):
        if path.name == "truncated.JPEG":
            continue
        modes.setdefault(Image.open(path).mode, path)
    assert {"L", "CMYK", "RGB"} <= set(modes)
    for path in modes.values():
        image = decode(str(path))
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and image.float().std() > 10
    with pytest.raises(BadImage, match="truncated.JPEG.*truncated"):
        decode(str(folder / "train" / "n00000003" / "truncated.JPEG"))


def _read_everything(data) -> None:
    for split in (data.train, data.val):
        for _ in eval_batches(data, split, 64):
            pass


def test_bad_image_error_names_the_file(folder):
    with pytest.raises(DataError, match=r"truncated\.JPEG.*on_bad_image: skip"):
        _read_everything(load_data(stream_cfg(folder, on_bad_image="error")))


def test_bad_image_skip_counts_it_and_keeps_batches_whole(folder):
    data = load_data(stream_cfg(folder))
    _read_everything(data)
    assert list(data.stats.bad_images) == [str(folder / "train" / "n00000003" / "truncated.JPEG")]
    for step in range(len(data.train) // 32):
        x, y = train_batch(data, 32, 0, 0, step)
        assert x.shape == (32, 3, 32, 32) and (y >= 0).all()


def test_batches_depend_on_seed_epoch_and_index_only(folder):
    """The same pixels whatever the worker count, the rows asked for, or the global RNG."""
    one, two = load_data(stream_cfg(folder, workers=0)), load_data(stream_cfg(folder, workers=2))
    for epoch, step in [(0, 0), (1, 3), (0, 1), (1, 4)]:  # out of order: the feed restarts
        x1, y1 = train_batch(one, 32, 0, epoch, step, "crop-flip")
        torch.manual_seed(epoch * 10 + step)
        x2, y2 = train_batch(two, 32, 0, epoch, step, "crop-flip")
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        part, labels = train_batch(two, 32, 0, epoch, step, "crop-flip", rows=slice(8, 24))
        assert torch.equal(part, x1[8:24]) and torch.equal(labels, y1[8:24])
    assert not torch.equal(train_batch(one, 32, 0, 2, 3, "crop-flip")[0], train_batch(one, 32, 0, 1, 3, "crop-flip")[0])
    assert one.stats.batches > 0 and one.stats.wait_s > 0


def test_a_rank_reads_only_its_rows_of_the_batch_it_asks_for(folder, monkeypatch):
    """A resumed block starts mid-epoch without reading the epoch; a team member decodes only its
    own rows (workers=0: decoding runs in this process, where it can be counted)."""
    data = load_data(stream_cfg(folder, workers=0, normalization="imagenet"))
    read: list[tuple[int, int]] = []
    real = streaming.load_sample

    def counting(path, geo, mode, seed, epoch, index):
        read.append((epoch, index))
        return real(path, geo, mode, seed, epoch, index)

    monkeypatch.setattr(streaming, "load_sample", counting)
    train_batch(data, 32, 0, 2, 5, rows=slice(16, 32))
    assert len(read) in (16, 17) and {e for e, _ in read} == {2}  # 17: a skipped file's substitute
    read.clear()
    train_batch(data, 32, 0, 2, 6, rows=slice(16, 32))  # the next batch: no restart, no more reads
    assert len(read) in (16, 17)


def test_memory_and_stream_give_the_same_images(folder):
    mem = load_data(stream_cfg(folder, storage="memory"))
    stream = load_data(stream_cfg(folder))
    assert mem.storage == "memory" and stream.storage == "stream"
    assert torch.equal(mem.mean, stream.mean) and torch.equal(mem.std, stream.std)
    for epoch, step in [(0, 0), (2, 5)]:
        (xm, ym), (xs, ys) = train_batch(mem, 32, 0, epoch, step), train_batch(stream, 32, 0, epoch, step)
        assert torch.equal(xm, xs) and torch.equal(ym, ys)
    for (xm, ym), (xs, ys) in zip(eval_batches(mem, mem.test, 25), eval_batches(stream, stream.test, 25)):
        assert torch.equal(xm, xs) and torch.equal(ym, ys)


def test_auto_storage_and_workers_never_fork(folder):
    assert load_data(stream_cfg(folder, storage="auto")).storage == "memory"
    assert load_data(stream_cfg(folder, storage="auto", memory_limit_gb=0.001)).storage == "stream"
    assert streaming._context().get_start_method() == "forkserver"
    with pytest.raises(DataError, match="always held in memory"):
        load_data(DataConfig(storage="stream"))


def test_stream_and_memory_train_identical_blocks(tmp_path):
    """The tiny job on the digits as PNG files: streamed and in memory, the same teacher and the
    same blocks, bit for bit; the report carries each rank's data wait."""
    from conftest import hpc

    root = digits_folder(tmp_path / "digits", per_class=60, size=32, lossless=True, val_per_class=10)
    states = {}
    for storage in ("memory", "stream"):
        run = tmp_path / storage
        hpc("distill", "-c", "tiny", "--run-dir", str(run), "--set", "data.dataset=imagefolder",
            "--set", f"data.root={root}", "--set", f"data.storage={storage}", "--set", "run.threads=1")
        blocks = sorted((run / "blocks").glob("*.pt"))
        assert blocks
        states[storage] = [torch.load(b, weights_only=True) for b in blocks]
        states[storage].append(torch.load(run / "teacher.pt", weights_only=True))
        report = json.loads((run / "report.json").read_text())
        assert all(r["data_wait_s"] is not None for r in report["ranks"])
    assert len(states["memory"]) == len(states["stream"])
    for a, b in zip(states["memory"], states["stream"]):
        sa, sb = a["state_dict"], b["state_dict"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_data_bench_shows_rates_next_to_consumption(folder, tmp_path):
    from conftest import hpc

    out = tmp_path / "bench.json"
    proc = hpc("data-bench", "-c", "tiny", "--set", "data.dataset=imagefolder", "--set", f"data.root={folder}",
               "--set", "data.storage=stream", "--set", "data.on_bad_image=skip", "--workers", "0,1",
               "--batches", "3", "--ranks", "2", "--json", str(out), "--set", "run.threads=1")
    assert "images/s" in proc.stdout and "a rank of the 2-rank plan consumes" in proc.stdout
    bench = json.loads(out.read_text())
    assert [r["workers"] for r in bench["rates"]] == [0, 1] and all(r["images_per_s"] > 0 for r in bench["rates"])
    assert bench["consumed_per_rank_images_per_s"] > 0 and bench["bad_images"] == 1


def test_cost_model_charges_the_input_and_the_cache_bytes():
    from hpc_bkd.blocks.models import build_model
    from hpc_bkd.blocks.surgery import find_blocks
    from hpc_bkd.costs.inputs import with_input
    from hpc_bkd.planning.inputs import InputCosts
    from hpc_bkd.planning.planner import BlockCost

    blocks = find_blocks(build_model("vgg11", 10, 0.125), (3, 32, 32))[:2]
    costs = [BlockCost(0.01, 0.02, 0.005), BlockCost(0.03, 0.02, 0.005)]
    # workers on cores of their own (p = 1): hidden, the input is only the plan's floor (test_plan)
    hidden = with_input(costs, blocks, 64, InputCosts(seconds=0.02), cached=False, epochs=4)
    assert [c.teacher for c in hidden] == [0.01, 0.03] and [c.student for c in hidden] == [0.02, 0.02]
    # no workers (p = 0.5): nothing overlaps, input and compute add up
    shared = with_input(costs, blocks, 64, InputCosts(seconds=0.02, shared_speed=0.5), cached=False, epochs=4)
    assert [c.teacher for c in shared] == pytest.approx([0.03, 0.05])
    assert [c.teacher for c in with_input(costs, blocks, 64, InputCosts(0.02, 0.5), False, 4, members=2)] == \
        pytest.approx([0.02, 0.04])  # a team member reads half the rows
    cached = with_input(costs, blocks, 64, InputCosts(store=1e-9, gather=1e-9), cached=True, epochs=4)
    extra = [c.student - 0.02 for c in cached]
    nbytes = [4 * 64 * (math.prod(b.in_shape) + math.prod(b.out_shape)) for b in blocks]
    assert extra == pytest.approx([n * 1e-9 * 1.25 for n in nbytes])  # fill once per run + gather every step
    assert extra[0] > extra[1]  # the early, larger activations cost more to cache
    # a member of a team of 2 stores and gathers half the rows and receives the other half
    member = with_input(costs, blocks, 64, InputCosts(store=1e-9, gather=1e-9, exchange=4e-9), True, 4, members=2)
    assert [c.student - 0.02 for c in member] == pytest.approx([n * (0.5e-9 + 2e-9) / 4 + n * 0.5e-9 for n in nbytes])


def test_shared_speed_is_measured_only_for_streamed_data(folder):
    from hpc_bkd.costs.inputs import input_seconds, shared_speed

    cpu = torch.device("cpu")
    assert shared_speed(load_data(DataConfig(dataset="digits"), 0), 64, 0, "none", 0.1, cpu) == 1.0
    data = load_data(stream_cfg(folder, workers=0), 0)  # decoded between steps: nothing overlaps
    assert shared_speed(data, 32, 0, "crop-flip", input_seconds(data, 32, 0, "crop-flip", 3), cpu) == 0.5
    data = load_data(stream_cfg(folder, workers=1), 0)
    seconds = input_seconds(data, 32, 0, "crop-flip", 3)
    assert seconds > 0
    fetched = data.stats.batches
    # at least 50 ms a batch: on an idle machine these tiny images decode so fast that the window
    # the workers stay busy falls under shared_speed's 5 ms floor and it (rightly) measures nothing
    speed = shared_speed(data, 32, 0, "crop-flip", max(seconds, 0.05), cpu)
    assert data.stats.batches > fetched and 0.25 <= speed <= 1.0  # timed beside fresh feeds' workers
    assert not data.train.pool.feeds  # and left no worker decoding in the background


def test_gpu_check_says_there_is_no_gpu_and_stops(tmp_path):
    """Without CUDA, `make gpu-check` says why in one line and exits 3 within seconds."""
    import os
    import subprocess
    import time

    from conftest import cli_env

    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=REPO,
                          env={**cli_env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "no CUDA GPU visible" in proc.stderr and "make gpu-check" in proc.stderr
    assert time.time() - t0 < 60 and not os.listdir(tmp_path)
