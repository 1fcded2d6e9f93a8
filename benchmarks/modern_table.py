"""The blocks hpc_bkd finds in every classification constructor of torchvision.models (#22).

Writes a Markdown table (unit and conv granularity, the layouts of the unit blocks) for
docs/modern-networks.md and a JSON file beside it: ``python -m benchmarks.modern_table --out DIR``.
Models are built without weights and traced once per granularity at ``--size`` (32: the digits and
CIFAR side; ViTs get ``image_size`` set to it, the only constructor argument they need for that).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision

from hpc_bkd.blocks.models import build_model
from hpc_bkd.blocks.surgery import find_blocks


def _kwargs(name: str, size: int) -> dict:
    """ViTs fix their input side at construction (224 by default), a multiple of their patch
    (``vit_h_14``: 28 for 32); every other family adapts."""
    if not name.startswith("vit_"):
        return {}
    patch = int(name.rsplit("_", 1)[1])
    return {"image_size": max(patch, size // patch * patch)}


def _count(model: torch.nn.Module, size: int, granularity: str) -> tuple[int, list[str]]:
    try:
        blocks = find_blocks(model, (3, size, size), granularity)
    except ValueError:  # "found no replaceable blocks"
        return 0, []
    return len(blocks), sorted({b.layout for b in blocks})


def survey(size: int, only: list[str] | None = None) -> list[dict]:
    rows = []
    for name in only or torchvision.models.list_models(module=torchvision.models):
        kwargs = _kwargs(name, size)
        start = time.perf_counter()
        try:
            model = build_model(f"torchvision:{name}", 10, 1.0, kwargs).eval()
            side = kwargs.get("image_size", size)  # a ViT's side, a multiple of its patch
            units, layouts = _count(model, side, "unit")
            convs, _ = _count(model, side, "conv")
            error = ""
        except Exception as exc:  # a constructor that cannot take 32x32 inputs: said in the table
            units, convs, layouts, error = 0, 0, [], f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        rows.append({"model": name, "kwargs": kwargs, "unit": units, "conv": convs, "layouts": layouts,
                     "error": error, "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name:<24} unit {units:>3} conv {convs:>3} {','.join(layouts):<8} {error}", flush=True)
    return rows


def markdown(rows: list[dict], size: int) -> str:
    lines = ["| model | `model.kwargs` | blocks at unit | blocks at conv | unit tensors |",
             "|---|---|---:|---:|---|"]
    for r in rows:
        kw = ", ".join(f"{k}: {v}" for k, v in r["kwargs"].items())
        note = f" ({r['error']})" if r["error"] else ""
        lines.append(f"| {r['model']} | {kw} | {r['unit']} | {r['conv']} | {', '.join(r['layouts'])}{note} |")
    return "\n".join(lines) + f"\n\nInputs {size}x{size} (a ViT: its image_size), 10 classes, no weights.\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/modern-table", help="folder for table.md and table.json")
    p.add_argument("--size", type=int, default=32, help="input side (default 32)")
    p.add_argument("--models", default=None, help="comma-separated subset (default: every classifier)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = survey(args.size, args.models.split(",") if args.models else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown(rows, args.size))
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out / 'table.md'}, {out / 'table.json'}")


if __name__ == "__main__":
    main()
