"""The two file formats a student ships in, and the one place that writes and opens them: a
``torch.export`` program (``.pt2``) and ONNX (``.onnx``), both taking a float32 NCHW batch of any
size under the input name ``input`` and returning ``logits``. ``export`` writes a run's files with
these; ``runtimes`` times options through them.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpc_bkd.errors import UserError
from hpc_bkd.store import atomic_io

FORMATS: dict[str, str] = {"pt2": "{role}.pt2", "onnx": "{role}.onnx"}  # format -> file name template
EXTRA = "pip install -e '.[export]'"
EXTRA_MODULES: dict[str, tuple[str, ...]] = {"pt2": (), "onnx": ("onnx", "onnxruntime", "onnxscript")}
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class MissingExtraError(UserError, ImportError, ValueError):
    """An export format needs a package that is not installed; the message names the extra.

    A UserError, so the CLI reports it as bad input (exit 2) and not as a crash."""


def require_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Validate ``formats`` and fail before any work when a package they need is missing."""
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown export format(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(FORMATS)}")
    for fmt in formats:
        why = missing_extra(fmt)
        if why:
            raise MissingExtraError(why)
    return formats


def missing_extra(fmt: str) -> str | None:
    """Why ``fmt`` cannot be exported here (a package of the export extra is missing), or None."""
    missing = [m for m in EXTRA_MODULES[fmt] if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"export format {fmt!r} needs {', '.join(missing)}, not installed: install the export extra with `{EXTRA}`"


def _example(shape: Sequence[int]) -> tuple[torch.Tensor]:
    return (torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)),)  # batch 2: not specialised


def _batch_dim() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1)},)


def export_pt2(model: nn.Module, shape: Sequence[int], path: Path) -> None:
    """``torch.export`` with a dynamic batch, saved atomically with ``torch.export.save``."""
    program = torch.export.export(model, _example(shape), dynamic_shapes=_batch_dim())
    atomic_io.write_atomically(path, lambda tmp: torch.export.save(program, tmp), keep_suffix=True)


def export_onnx(model: nn.Module, shape: Sequence[int], path: Path) -> None:
    """ONNX through torch's exporter (torch.export based), one self-contained file, checked."""
    import onnx

    external = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8 * 2**30  # protobuf's 2 GB

    def write(target: str | Path) -> None:
        torch.onnx.export(model, _example(shape), target, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=_batch_dim(), dynamo=True, external_data=external, verbose=False)

    if external:  # weights go to <name>.data next to the file: it must be written under its own name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    else:
        atomic_io.write_atomically(path, write, keep_suffix=True)
    onnx.checker.check_model(str(path))


def ort_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (torch's count by default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
