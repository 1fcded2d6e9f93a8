"""The extension points, used as a user would: a data source and a candidate kind defined in a
script outside the package, registered there, and a tiny job run with them on two MPI ranks (each
rank runs the script, so each registers them), exported, its card naming the source's classes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MPIRUN, REPO, cli_env

TOY_JOB = '''
import sys

import torch
from torch import nn

from hpc_bkd.blocks.candidates import Kind, register_kind
from hpc_bkd.cli.main import main
from hpc_bkd.data.batches import ImageSet
from hpc_bkd.data.sources import DataSource, register_source

CLASSES = ["vertical", "horizontal"]


class Stripes(DataSource):
    """Noise with bright stripes, vertical or horizontal: made here, read from no file."""

    name = "stripes"
    needs_root = False

    def load(self, cfg, device, stats):
        gen = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 2, (400,), generator=gen)
        size = cfg.image_size
        images = torch.randint(0, 64, (400, 3, size, size), generator=gen).to(torch.uint8)
        images[labels == 0, :, :, ::4] = 255
        images[labels == 1, :, ::4, :] = 255
        return ImageSet(images[:320], labels[:320]), ImageSet(images[320:], labels[320:]), CLASSES

    def class_names(self, cfg):
        return CLASSES


def pointwise(spec, params, teacher):
    """A 1x1 convolution (strided like the block) and a BatchNorm: the cheapest student there is."""
    cin, cout = spec.in_shape[0], spec.out_shape[0]
    return lambda: [nn.Conv2d(cin, cout, 1, stride=spec.stride, bias=False), nn.BatchNorm2d(cout)]


register_source(Stripes())
register_kind(Kind("pointwise", {}, (), "a strided 1x1 conv + BN", builder=f"{__name__}:pointwise"))
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.mpi
def test_a_data_source_and_a_candidate_kind_from_outside_the_package(tmp_path: Path):
    script = tmp_path / "toy_job.py"
    script.write_text(TOY_JOB)
    run = tmp_path / "run"
    cmd = [str(MPIRUN), "-np", "2", sys.executable, str(script), "run", "-c", "tiny", "--run-dir", str(run),
           "--set", "data.dataset=stripes", "--set", "blocks.candidates=pointwise",
           "--set", "run.threads=1", "--set", "run.export=true", "--set", "run.export_formats=onnx"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((run / "report.json").read_text())
    assert len(report["blocks"]) > 1 and {b["candidate"] for b in report["blocks"]} == {"pointwise"}
    assert {b["rank"] for b in report["blocks"]} == {0, 1}  # both ranks built the toy kind
    assert (run / "blocks" / "block-000-pointwise.pt").is_file()
    card = json.loads((run / "export" / "model.json").read_text())
    assert card["output"]["class_names"] == ["vertical", "horizontal"]
    assert card["output"]["num_classes"] == 2


def test_an_unregistered_source_is_refused_before_anything_is_written(tmp_path: Path):
    """Without the script's registration the name is unknown: exit 2, naming the valid ones."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "hpc_bkd", "run", "-c", "tiny", "--run-dir", str(run),
                           "--set", "data.dataset=stripes"], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=cli_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "unknown data.dataset 'stripes'; valid: digits, cifar10, cifar100, imagefolder" in proc.stderr
    assert [p.name for p in run.iterdir()] == ["job.lock"]  # the lock that refuses a second job, only
