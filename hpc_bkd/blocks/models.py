"""Teacher architectures: CIFAR-style VGG-BN and ResNet, plus any torchvision.models constructor
(and any timm model where the optional ``timm`` extra is installed), with keyword arguments.

Only the constructors live here. Nothing else in the toolkit knows about architectures: surgery finds
blocks generically with forward hooks (see ``surgery.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

VGG_LAYOUTS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
ARCHS = sorted(VGG_LAYOUTS) + sorted(RESNET_LAYOUTS) + ["torchvision:<name>", "timm:<name>"]


def _scaled(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


class CifarVGG(nn.Module):
    """VGG with BatchNorm for small images: conv-BN-ReLU stacks, max-pools, global pool, one linear."""

    def __init__(self, layout: list[int | str], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out_ch = _scaled(int(item), width)
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                           nn.ReLU(inplace=True)]
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class CifarResNet(nn.Module):
    """ResNet with a 3x3 stride-1 stem and no max-pool (the usual CIFAR adaptation).

    Uses torchvision's own BasicBlock/Bottleneck so residual units look exactly like torchvision's.
    """

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        planes = [_scaled(p, width) for p in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        stages = [self._make_layer(block, p, n, stride=1 if i == 0 else 2)
                  for i, (p, n) in enumerate(zip(planes, layers))]
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[nn.Module], planes: int, count: int, stride: int) -> nn.Sequential:
        expansion = block.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * expansion))
        units = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * expansion
        units += [block(self.inplanes, planes) for _ in range(count - 1)]
        return nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(arch: str, num_classes: int, width: float = 1.0,
                kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A freshly initialised network; ``torchvision:<name>`` builds ``torchvision.models.<name>``
    and ``timm:<name>`` timm's model, each with ``kwargs`` (``model.kwargs``) and no weights."""
    kwargs = dict(kwargs or {})
    if arch in VGG_LAYOUTS:
        return CifarVGG(VGG_LAYOUTS[arch], num_classes, width)
    if arch in RESNET_LAYOUTS:
        block, layers = RESNET_LAYOUTS[arch]
        return CifarResNet(block, layers, num_classes, width)
    if arch.startswith("torchvision:"):
        name = arch.split(":", 1)[1]
        cls = getattr(torchvision.models, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):  # a class (VisionTransformer): any size
            return _construct(arch, lambda: cls(num_classes=num_classes, **kwargs), kwargs)
        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError:
            valid = ", ".join(torchvision.models.list_models(module=torchvision.models))
            raise ValueError(f"unknown torchvision model {name!r}; valid: {valid} (or a model class such as "
                             "VisionTransformer, with model.kwargs)") from None
        return _construct(arch, lambda: builder(weights=None, num_classes=num_classes, **kwargs), kwargs)
    if arch.startswith("timm:"):
        return _timm_model(arch.split(":", 1)[1], num_classes, kwargs)
    raise ValueError(f"unknown model.arch {arch!r}; valid: {', '.join(ARCHS)}")


def _construct(arch: str, make: Callable[[], nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    """``make()``, with a constructor's complaint about ``model.kwargs`` said as a config error."""
    try:
        return make()
    except (TypeError, ValueError, AssertionError) as exc:
        if not kwargs:
            raise
        raise ValueError(f"model.kwargs {kwargs} do not fit {arch}: {exc or type(exc).__name__}") from None


def _timm_model(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """timm's ``name`` without pretrained weights (nothing is downloaded at run time)."""
    try:
        import timm
    except ImportError:
        raise ValueError(f"model.arch timm:{name} needs timm: pip install 'hpc_bkd[timm]' "
                         "(or pip install timm)") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (timm.list_models() lists them)")
    return _construct(f"timm:{name}", lambda: timm.create_model(name, pretrained=False, num_classes=num_classes,
                                                                **kwargs), kwargs)
