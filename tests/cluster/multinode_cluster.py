"""Session fixture `multinode_cluster`: a real multi-node SLURM on this machine
(tests/cluster/multinode-slurm.sh): nodes n1..nN, each in its own network, UTS, IPC and mount
namespaces, with its own hostname, address and /dev/shm; the filesystem is shared except
``private`` (each node sees its own directory there).

Skips when not root, unless HPC_BKD_REQUIRE_SLURM=1 (then it fails, as the single-node fixture
does). HPC_BKD_SKIP_SLURM=1 skips on purpose. Stopped at session end if this fixture started it.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, _fail_or_skip, _run_script

SCRIPT = Path(__file__).resolve().with_name("multinode-slurm.sh")
NODES = int(os.environ.get("HPC_BKD_MN_NODES", "2"))
START_TIMEOUT = float(os.environ.get("HPC_BKD_SLURM_START_TIMEOUT", "900"))  # apt included


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The `export` lines of ``multinode-slurm.sh env`` (with ``extra`` knobs) as a dict."""
    env = dict(os.environ, **(extra or {}))
    r = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True, timeout=30, env=env)
    return dict(re.findall(r"^export (\w+)=(.*)$", r.stdout, re.M))


def run_script(action: str, log: Path, timeout: float = 120, extra: dict[str, str] | None = None) -> tuple[int, str]:
    """``multinode-slurm.sh ACTION`` (output to a file, own process group), as `_run_script`."""
    return _run_script(action, log, timeout, script=SCRIPT, env=dict(os.environ, **(extra or {})))


class MultinodeCluster(SlurmCluster):
    """The running multi-node cluster: SlurmCluster's job helpers with this cluster's SLURM_CONF,
    plus its nodes, their private directories, and node failure."""

    def __init__(self, conf: dict[str, str], workdir: Path, started_here: bool) -> None:
        super().__init__(Path(conf["HPC_BKD_MN_DIR"]), conf["HPC_BKD_MN_PARTITION"], 2, workdir, started_here)
        self.env["SLURM_CONF"] = conf["SLURM_CONF"]
        self.nodes = [f"n{i}" for i in range(1, int(conf["HPC_BKD_MN_NODES"]) + 1)]
        self.private = Path(conf["HPC_BKD_MN_PRIVATE"])  # the path every node sees as its own
        self.logs = Path(conf["HPC_BKD_MN_LOGS"])

    def node_private(self, node: str) -> Path:
        """Where node ``node``'s ``private`` directory lives, seen from this (the machine's) namespace."""
        return self.state_dir / "nodes" / node / "private"

    def node_pids(self, node: str) -> list[int]:
        """Every process running on ``node`` (its network namespace)."""
        r = subprocess.run(["ip", "netns", "pids", f"hbkd-{node}"], capture_output=True, text=True, timeout=10)
        return [int(p) for p in r.stdout.split()]

    def kill_node(self, node: str) -> float:
        """The node fails: its link goes down and every process on it is SIGKILLed. Returns the
        monotonic time of its death."""
        r = self.run("bash", str(SCRIPT), "kill-node", node, check=False, timeout=60)
        assert r.returncode == 0, r.stderr
        return time.monotonic()

    def revive_node(self, node: str) -> None:
        r = self.run("bash", str(SCRIPT), "revive-node", node, check=False, timeout=120)
        assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def multinode_cluster(tmp_path_factory):
    """Start (or reuse) the multi-node cluster with ``NODES`` nodes; yields a MultinodeCluster."""
    if os.environ.get("HPC_BKD_SKIP_SLURM") == "1":
        pytest.skip("HPC_BKD_SKIP_SLURM=1")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _fail_or_skip("the multi-node cluster needs root (network namespaces)")
    work = tmp_path_factory.mktemp("multinode")
    up = run_script("status", work / "status.log", 30)[0] == 0
    t0 = time.monotonic()
    rc, out = run_script(f"start {NODES}", work / "start.log", START_TIMEOUT)
    if rc in (3, 4):
        _fail_or_skip(f"multinode-slurm.sh start exited {rc}:\n{out[-2000:]}")
    if rc != 0:
        pytest.fail(f"tests/cluster/multinode-slurm.sh start exited {rc}:\n{out[-4000:]}", pytrace=False)
    cluster = MultinodeCluster(script_env(), work, started_here=not up)
    cluster.start_seconds = time.monotonic() - t0
    try:
        yield cluster
    finally:
        if cluster.started_here:
            run_script("stop", work / "stop.log", 120)
