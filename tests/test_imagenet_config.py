"""The shipped resnet50-imagenet config: torchvision's ResNet50 at 224 from a local state_dict, and
a teacher cache that cannot hold ImageNet, so the teacher runs on every batch and the log says so."""
from __future__ import annotations

import torch

from hpc_bkd.blocks.models import build_model
from hpc_bkd.blocks.surgery import find_blocks
from hpc_bkd.config import load_config
from hpc_bkd.distill.teacher import load_teacher_checkpoint
from hpc_bkd.distill.teacher_cache import decide
from hpc_bkd.planning.schedule import schedule_for


def test_resnet50_imagenet_from_local_weights_streams_without_a_cache(tmp_path):
    cfg = load_config("resnet50-imagenet")
    assert cfg.model.arch == "torchvision:resnet50" and cfg.data.image_size == 224
    assert cfg.data.storage == "stream" and cfg.run.precision == "bf16"
    weights = tmp_path / "r50.pt"
    torch.save(build_model(cfg.model.arch, 1000).state_dict(), weights)  # as a user saves torchvision's
    teacher = load_teacher_checkpoint(weights, build_model(cfg.model.arch, 1000)).eval()
    blocks = find_blocks(teacher, (3, 224, 224), cfg.blocks.granularity)
    assert len(blocks) == 16
    decision = decide("auto", "none", schedule_for("parallel"), blocks, 1_268_356, budget=64 * 2**30)
    assert not decision.use and "the teacher runs on every batch" in decision.reason
    assert decision.needed_bytes > 1e12  # ImageNet's activations: terabytes
