"""Shared fixtures: run the real CLI (alone or under the bundled mpirun), a tiny trained teacher."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "cluster"))  # the local SLURM test cluster and its fixture
from multinode_cluster import multinode_cluster  # noqa: E402,F401  (session fixture: a multi-node SLURM)
from slurm_cluster import slurm_cluster  # noqa: E402,F401  (session fixture: a real local SLURM)

REPO = Path(__file__).resolve().parents[1]

# The first lines of a script that checks an export in a fresh interpreter (run with -I: no cwd,
# no PYTHONPATH) with hpc_bkd blocked outright, since the editable install would still find it.
WITHOUT_HPC_BKD = """import sys
sys.modules["hpc_bkd"] = None
try:
    import hpc_bkd  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("hpc_bkd is importable: the check would prove nothing")
"""
# Loads an export's .pt2 and ONNX files in a process without hpc_bkd and compares them with the
# in-toolkit student's logits (argv: export dir, a torch file of inputs and logits); prints JSON.
STANDALONE = WITHOUT_HPC_BKD + textwrap.dedent("""
    import json
    import numpy as np
    import onnxruntime as ort
    import torch

    export_dir, data = sys.argv[1], torch.load(sys.argv[2])
    x, want = data["inputs"], data["logits"]
    pt2 = torch.export.load(f"{export_dir}/student.pt2").module()
    with torch.no_grad():
        got_pt2 = pt2(x)
    session = ort.InferenceSession(f"{export_dir}/student.onnx", providers=["CPUExecutionProvider"])
    got_onnx = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    card = json.load(open(f"{export_dir}/model.json"))
    print(json.dumps({"pt2": float((got_pt2 - want).abs().max()), "onnx": float((got_onnx - want).abs().max()),
                      "classes": card["output"]["num_classes"], "hpc_bkd_loaded": any(k.split(".")[0] == "hpc_bkd" and m is not None
                                            for k, m in sys.modules.items())}))
""")
BIN = Path(sys.executable).parent
MPIRUN = BIN / "mpirun"


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "SLURM_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def hpc(*args: str, np: int | None = None, timeout: float = 300, cwd: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m hpc_bkd ARGS``, under ``mpirun -np NP`` when ``np`` is given."""
    cmd = [sys.executable, "-m", "hpc_bkd", *args]
    if np is not None:
        cmd = [str(MPIRUN), "-np", str(np), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=cli_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                             f"\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A teacher for the `tiny` config, trained once per session (single thread: deterministic)."""
    run_dir = tmp_path_factory.mktemp("tiny-teacher")
    hpc("train-teacher", "-c", "tiny", "--run-dir", str(run_dir), "--set", "run.threads=1")
    return run_dir / "teacher.pt"
