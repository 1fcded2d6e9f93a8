"""Modern networks (#22): constructor kwargs, units of any torchvision family, whole-unit students."""
from __future__ import annotations

import pytest

from hpc_bkd.config import ConfigError, config_from_dict, load_config
from hpc_bkd.models import build_model


def test_model_kwargs_from_yaml_and_set():
    cfg = load_config("tiny", ["model.arch=torchvision:vit_b_16", "model.kwargs.image_size=32"])
    assert cfg.model.kwargs == {"image_size": 32}
    assert build_model(cfg.model.arch, 10, 1.0, cfg.model.kwargs).image_size == 32
    small = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}
    model = build_model("torchvision:VisionTransformer", 10, 1.0, small)  # a class: any size
    assert len(model.encoder.layers) == 2 and model.hidden_dim == 16


@pytest.mark.parametrize("raw, match", [
    ({"model": {"arch": "vgg11", "kwargs": {"image_size": 32}}}, "only for model.arch torchvision"),
    ({"model": {"arch": "torchvision:vit_b_16", "kwargs": {"num_classes": 3}}}, "set by the toolkit"),
    ({"model": {"arch": "torchvision:vit_b_16", "kwargs": [1, 2]}}, "expected a mapping"),
    ({"model": {"arch": "torchvision:vit_b_16", "kwargs": {"image_size": {"a": 1}}}}, "model.kwargs.image_size"),
])
def test_bad_model_kwargs_are_rejected(raw, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_unknown_kwarg_names_the_constructor():
    with pytest.raises(ValueError, match="model.kwargs .*bogus.* torchvision:resnet18"):
        build_model("torchvision:resnet18", 10, 1.0, {"bogus": 1})


def test_timm_models_build_with_kwargs():
    pytest.importorskip("timm")
    model = build_model("timm:resnet18", 10, 1.0, {"drop_rate": 0.1})
    assert model.num_classes == 10
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model("timm:no_such_net", 10)
