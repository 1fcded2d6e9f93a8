"""run.precision: bf16 converges on the tiny job on CPU, fp16 steps with a gradient scaler, and
whatever the arithmetic, every saved weight is float32."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import hpc
from torch import nn

from hpc_bkd.distill.precision import Amp, autocast


def _run(tmp_path, teacher, precision: str) -> dict:
    run = tmp_path / precision
    hpc("run", "-c", "tiny", "--run-dir", str(run), "--set", f"teacher.checkpoint={teacher}",
        "--set", f"run.precision={precision}", "--set", "run.threads=1")
    return {"report": json.loads((run / "report.json").read_text()), "dir": run}


def test_bf16_converges_on_the_tiny_job_and_saves_fp32(tmp_path, tiny_teacher):
    fp32, bf16 = _run(tmp_path, tiny_teacher, "fp32"), _run(tmp_path, tiny_teacher, "bf16")
    for a, b in zip(fp32["report"]["blocks"], bf16["report"]["blocks"]):
        first, last = b["history"][0]["loss"], b["final_loss"]
        assert last <= first and last <= 1.5 * a["final_loss"] + 1e-3, (b["name"], a["final_loss"], last)
        assert b["swapped_val_acc"] >= a["swapped_val_acc"] - 5.0
    acc32, acc16 = (r["report"]["accuracy"]["student_after_finetune"] for r in (fp32, bf16))
    assert acc16 >= acc32 - 5.0
    for path in [*(bf16["dir"] / "blocks").glob("*.pt"), bf16["dir"] / "student.pt"]:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(v.dtype in (torch.float32, torch.int64) for v in state.values()), path


def test_fp16_steps_with_a_gradient_scaler():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    amp = Amp("fp16", torch.device("cpu"))
    assert amp.scaler is not None
    x, target = torch.randn(16, 4, 8, 8), torch.randn(16, 4, 8, 8) * 0.1
    losses = []
    for _ in range(20):
        with amp.autocast():
            out = model(x)
        assert out.dtype == torch.float16
        loss = nn.functional.mse_loss(out.float(), target)
        opt.zero_grad()
        amp.backward(loss)
        amp.step(opt)
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(p.dtype == torch.float32 for p in model.parameters())
    # a resumed block goes on with the scale it had (distill checkpoints carry amp.state_dict())
    amp.scaler.update(1024.0)
    again = Amp("fp16", torch.device("cpu"))
    again.load_state_dict(amp.state_dict())
    assert again.scaler.get_scale() == 1024.0 and again.state_dict() == amp.state_dict()
    assert Amp("fp32").state_dict() == {}


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_is_a_no_op_for_fp32(precision, dtype):
    with autocast(precision, torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
