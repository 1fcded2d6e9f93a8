"""Generated ImageFolders for the streaming tests and the data benchmark (no downloads).

``digits_folder``: the bundled digits as files, in the shapes real folders come in: nested class
folders, ``.JPEG`` and ``.png``, grayscale and CMYK JPEGs, a BMP (decoded by PIL, not torchvision),
and optionally one truncated JPEG. ``synthetic_folder``: many larger generated photos-like JPEGs
for throughput and memory figures.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 RGB arrays of ``size`` x ``size`` (bilinear upscaling, as data.py does)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) * (255.0 / 16.0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 255).round_()
    rgb = x.to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
    return rgb, digits.target


def digits_folder(root: Path, per_class: int = 30, size: int = 64, lossless: bool = False,
                  truncated: bool = True, val_per_class: int = 6) -> Path:
    """``root/train/<class>/...`` and ``root/val/<class>/...`` from the digits. ``lossless``: PNG
    only (pixels exactly the digits'); otherwise a mix of formats, tinted so that colour matters."""
    from PIL import Image

    images, labels = _digit_images(size)
    classes = [f"n{c:08d}" for c in range(10)]  # ImageNet-like wnids
    counts: dict[tuple[str, int], int] = {}
    for i, (img, c) in enumerate(zip(images, labels)):
        split = "train" if counts.get(("train", c), 0) < per_class else "val"
        if counts.get((split, c), 0) >= (per_class if split == "train" else val_per_class):
            continue
        k = counts[(split, c)] = counts.get((split, c), 0) + 1
        folder = root / split / classes[c] / ("nested" if k % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(img)
        if lossless:
            pil.save(folder / f"img{i:05d}.png")
            continue
        pil = Image.fromarray((img * np.array([1.0, 0.8, 0.6])).astype(np.uint8))
        kind = i % 7
        if kind == 0:
            pil.save(folder / f"img{i:05d}.png")
        elif kind == 1:
            pil.convert("L").save(folder / f"img{i:05d}.JPEG", quality=90)
        elif kind == 2:
            pil.convert("CMYK").save(folder / f"img{i:05d}.JPEG", quality=90)
        elif kind == 3 and split == "train":
            pil.save(folder / f"img{i:05d}.bmp")
        else:
            pil.save(folder / f"img{i:05d}.JPEG", quality=90)
    if truncated and not lossless:
        bad = root / "train" / classes[3] / "truncated.JPEG"
        good = next((root / "train" / classes[3]).glob("*.JPEG")).read_bytes()
        bad.write_bytes(good[: len(good) // 2])
    return root


def synthetic_folder(root: Path, images: int, size: int = 224, classes: int = 100, quality: int = 90,
                     seed: int = 0) -> Path:
    """``images`` generated JPEGs (smooth gradients, shapes and noise, so they compress like
    photos rather than like flat colour) under ``root/train`` (90 %) and ``root/val``; files that
    exist are kept, so a larger folder reuses a smaller one's."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(images):
        split = "val" if (i // classes) % 10 == 9 else "train"  # every class in both splits
        folder = root / split / f"c{i % classes:04d}"
        path = folder / f"{i:07d}.JPEG"
        if path.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 1, 3)
        base = np.stack([xx * a + yy * (1 - a), (1 - xx) * b + yy * c, xx * yy * c + b * (1 - yy)], -1) * 200
        base += rng.normal(0, 12, base.shape)
        pil = Image.fromarray(base.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _ in range(4):
            x0, y0 = rng.integers(0, size, 2)
            draw.ellipse([int(x0), int(y0), int(x0) + size // 4, int(y0) + size // 5],
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        pil.save(path, quality=quality)
    return root
