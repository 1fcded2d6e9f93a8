"""A torch.distributed team meets at an address its members really reach, or says at once that it
cannot (#15: a cross-node Gloo team used to retry its rendezvous for five minutes in silence).
Across real nodes: tests/launch/test_multinode.py."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import MPIRUN, REPO, cli_env

from hpc_bkd.distributed.netaddr import LOOPBACK, offered_addresses

# one Gloo team of every rank: report the sum of the ranks + 1, or the error and how long it took
TEAM = """
import sys, time, torch
from mpi4py import MPI
from hpc_bkd.distill.teams import Team
t0 = time.monotonic()
try:
    team = Team(MPI.COMM_WORLD, backend="gloo")
except Exception as exc:
    print(f"{type(exc).__name__} after {time.monotonic() - t0:.1f}s: {exc}", flush=True)
    sys.exit(2)
x = torch.tensor([MPI.COMM_WORLD.rank + 1.0])
team.allreduce_(x)
print(f"sum {x.item():g}", flush=True)
team.close()
"""


def _team(env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([str(MPIRUN), "-np", "2", sys.executable, "-c", TEAM], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=dict(cli_env(), **env))


@pytest.mark.mpi
def test_a_gloo_team_that_cannot_meet_fails_at_once_naming_the_address():
    """HPC_BKD_TEAM_ADDR names an address no member reaches (TEST-NET-1): every member fails within
    the 5 s probe, naming the address, the port and what to set, instead of waiting."""
    t0 = time.monotonic()
    proc = _team({"HPC_BKD_TEAM_ADDR": "192.0.2.1"})
    took = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert proc.stdout.count("TeamRendezvousError") == 2, proc.stdout + proc.stderr
    assert "tried 192.0.2.1 on test port" in proc.stdout and "HPC_BKD_TEAM_ADDR" in proc.stdout
    assert took < 60, took


@pytest.mark.mpi
def test_a_gloo_team_on_one_host_meets_on_loopback():
    proc = _team({})
    assert proc.returncode == 0 and proc.stdout.count("sum 3") == 2, proc.stdout + proc.stderr


def test_offered_addresses_are_never_loopback():
    """Members on other nodes would reach their own loopback, not the leader's."""
    addresses = offered_addresses("localhost")
    assert LOOPBACK not in addresses and not any(a.startswith("127.") for a in addresses)
