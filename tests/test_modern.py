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


# Unit discovery: every family the issue lists, at small inputs (the oracle counts the family's own
# unit class in the model; the code under test knows no class names).
FAMILIES = [
    ("resnet18", {}, "BasicBlock", "chw"),
    ("resnext50_32x4d", {}, "Bottleneck", "chw"),
    ("wide_resnet50_2", {}, "Bottleneck", "chw"),
    ("regnet_x_400mf", {}, "ResBottleneckBlock", "chw"),
    ("mobilenet_v2", {"width_mult": 0.25}, "InvertedResidual", "chw"),
    ("mobilenet_v3_small", {"width_mult": 0.25}, "InvertedResidual", "chw"),
    ("mnasnet0_5", {}, "_InvertedResidual", "chw"),
    ("efficientnet_b0", {}, "MBConv", "chw"),
    ("efficientnet_v2_s", {}, ("MBConv", "FusedMBConv"), "chw"),
    ("shufflenet_v2_x0_5", {}, "InvertedResidual", "chw"),
    ("convnext_tiny", {}, "CNBlock", "chw"),
    ("swin_t", {}, "SwinTransformerBlock", "hwc"),
    ("VisionTransformer", {"image_size": 32, "patch_size": 8, "num_layers": 3, "num_heads": 2, "hidden_dim": 16,
                           "mlp_dim": 32}, "EncoderBlock", "tokens"),
]


@pytest.mark.parametrize("name, kwargs, unit_class, layout", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_units_of_every_family(name, kwargs, unit_class, layout):
    from hpc_bkd.surgery import find_blocks
    model = build_model(f"torchvision:{name}", 10, 1.0, kwargs).eval()
    classes = unit_class if isinstance(unit_class, tuple) else (unit_class,)
    expected = [n for n, m in model.named_modules() if type(m).__name__ in classes]
    blocks = find_blocks(model, (3, 32, 32), "unit")
    assert [b.name for b in blocks] == expected
    assert {b.layout for b in blocks} == {layout}
    assert all(len(b.in_shape) == (2 if layout == "tokens" else 3) for b in blocks)
    assert sum(b.macs for b in blocks) > 0 and blocks[-1].prefix_macs > blocks[0].prefix_macs


def test_conv_granularity_takes_grouped_not_depthwise_convs():
    from hpc_bkd.surgery import find_blocks
    resnext = build_model("torchvision:resnext50_32x4d", 10).eval()
    assert len(find_blocks(resnext, (3, 32, 32), "conv")) == 16  # the grouped 3x3 of each bottleneck
    mobile = build_model("torchvision:mobilenet_v2", 10, 1.0, {"width_mult": 0.25}).eval()
    assert len(find_blocks(mobile, (3, 32, 32), "conv")) == 1  # only the dense stem: the rest is depthwise
