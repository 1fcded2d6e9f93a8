"""One image file to one uint8 tensor: decoding, resizing and per-sample augmentation.

Runs in DataLoader worker processes (``streaming.py``), so it imports nothing that starts MPI.

* Decoding: torchvision's decoder (libjpeg-turbo for JPEG, libpng, libwebp) straight into a
  tensor; PIL for what it cannot read (BMP, TIFF, ...). A file neither can decode is a
  ``BadImage`` naming it; a truncated JPEG is one (libjpeg-turbo refuses it, PIL does too).
* Geometry: evaluation (and training without augmentation) resizes the shorter side to
  ``size / crop_fraction`` and takes the centre ``size`` x ``size`` (ImageNet's 256 -> 224 at
  0.875); training with augmentation takes a random-resized crop (scale 0.08-1, aspect 3/4-4/3, as
  torchvision and the ImageNet literature) and, for ``crop-flip``, a horizontal flip.
* Randomness: each sample's crop and flip come from a generator seeded by (seed, epoch, image
  index), never by the rank or the worker that decodes it, so every rank and every worker count sees
  the same pixels for the same batch.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

EVAL, CROP, CROP_FLIP = 0, 1, 2  # what a sample key asks for (``mode_for``)
_SCALE = (0.08, 1.0)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class BadImage(ValueError):
    """A file that neither torchvision nor PIL can decode."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path, self.reason = path, reason


def mode_for(augment: str) -> int:
    """The sample mode for ``data.augment`` when streaming (none: the evaluation geometry)."""
    return {"none": EVAL, "crop": CROP, "crop-flip": CROP_FLIP}[augment]


@dataclass(frozen=True)
class Geometry:
    """Output side and the evaluation crop's share of the resized image."""

    size: int
    crop_fraction: float = 1.0


def decode(path: str) -> torch.Tensor:
    """The RGB image at ``path`` as a 3 x H x W uint8 tensor (grayscale and CMYK converted)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise BadImage(path, f"cannot read ({exc.strerror or exc})") from None
    if not raw:  # torch.frombuffer refuses an empty buffer with a ValueError that names no file
        raise BadImage(path, "the file is empty (0 bytes)")
    try:
        return decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as first:  # "decode_jpeg, <source file>:<line>, <what>": keep <what>
        return _decode_pil(path, raw, str(first).splitlines()[-1].split(", ")[-1])


def _decode_pil(path: str, raw: bytes, first: str) -> torch.Tensor:
    """PIL's decoder, for formats torchvision's does not read (BMP, TIFF, ...)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise BadImage(path, f"{exc} (torchvision: {first})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation: (seed, epoch, image index) and nothing else."""
    return np.random.default_rng([seed, epoch, index])


def random_crop_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop: torchvision's rule with our generator."""
    area = h * w
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ratio = w / h  # fallback: the centre crop of the allowed aspect closest to the image's
    if ratio < _RATIO[0]:
        cw, ch = w, int(round(w / _RATIO[0]))
    elif ratio > _RATIO[1]:
        ch, cw = h, int(round(h * _RATIO[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def eval_view(image: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Shorter side to ``size / crop_fraction``, then the centre ``size`` x ``size``."""
    short = max(geo.size, int(round(geo.size / geo.crop_fraction)))
    h, w = image.shape[-2:]
    if min(h, w) != short:
        image = TF.resize(image, [short], antialias=True)
    return TF.center_crop(image, [geo.size, geo.size]).contiguous()


def train_view(image: torch.Tensor, geo: Geometry, mode: int, rng: np.random.Generator) -> torch.Tensor:
    """A random-resized crop to ``size`` x ``size``, flipped half the time for ``CROP_FLIP``."""
    top, left, ch, cw = random_crop_box(image.shape[-2], image.shape[-1], rng)
    out = TF.resized_crop(image, top, left, ch, cw, [geo.size, geo.size], antialias=True)
    if mode == CROP_FLIP and rng.random() < 0.5:
        out = out.flip(-1)
    return out.contiguous()


def load_sample(path: str, geo: Geometry, mode: int, seed: int, epoch: int, index: int) -> torch.Tensor:
    """One sample as the network sees it (uint8, 3 x size x size)."""
    image = decode(path)
    if mode == EVAL:
        return eval_view(image, geo)
    return train_view(image, geo, mode, sample_rng(seed, epoch, index))
