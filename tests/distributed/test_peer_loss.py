"""Never a silent hang (issue 15, item 3): a rank that dies or stops answering ends the job within
a bounded time, with a message naming the lost rank and host, and the re-run resumes without
retraining any finished block.

Under the bundled ``mpirun`` (MPICH hydra) a SIGKILLed rank takes the job down at once (hydra
kills the rest: checked here too). A rank that stops answering without exiting (SIGSTOP: a hung
process or node, what ``srun`` without ``--kill-on-bad-exit`` leaves after a death as well) is
left to the job, and the heartbeat (``hpc_bkd.distributed.peers``) must find it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MPIRUN, REPO, cli_env, hpc

from hpc_bkd.config import ConfigError, load_config
from hpc_bkd.distributed.peers import LostPeer, PeerLost, heartbeat_period

TIMEOUT_S = 3


def _rank_pid(rank: int, run: Path) -> int | None:
    """The pid of this job's MPI rank ``rank`` (hydra sets PMI_RANK), found in /proc."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(run).encode() in (entry / "cmdline").read_bytes() \
                    and f"PMI_RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:
            continue
    return None


def _blocks(run: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "blocks").glob("block-???-*[0-9].pt")}


@pytest.mark.parametrize("sig,rank", [(signal.SIGSTOP, 1), (signal.SIGSTOP, 0), (signal.SIGKILL, 1)])
def test_a_lost_rank_ends_the_job_and_the_rerun_resumes(tmp_path: Path, tiny_teacher: Path, sig: int, rank: int):
    run = tmp_path / "run"
    args = ["distill", "-c", "tiny", "--run-dir", str(run), "--set", f"teacher.checkpoint={tiny_teacher}",
            "--set", "run.threads=1", "--set", "distill.epochs=6", "--set", "distill.schedule=sequential",
            "--set", "plan.hybrid=false", "--set", f"run.peer_timeout_s={TIMEOUT_S}"]
    proc = subprocess.Popen([str(MPIRUN), "-np", "2", sys.executable, "-m", "hpc_bkd", *args], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid, deadline = None, time.time() + 120
    try:
        while not (_blocks(run) and pid):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            pid = pid or _rank_pid(rank, run)
            time.sleep(0.02)
        os.kill(pid, sig)
        lost_at = time.time()
        out, err = proc.communicate(timeout=60)
        took = time.time() - lost_at
    finally:
        if pid:
            subprocess.run(["kill", "-KILL", str(pid)], capture_output=True)
        proc.kill()
    assert proc.returncode != 0, err
    if sig == signal.SIGKILL:  # hydra: the whole job, at once
        assert took < 15 and f"RUNNING AT {socket.gethostname()}" in out and "EXIT CODE: 9" in out, out
    else:
        assert took < TIMEOUT_S + 20, (took, err)
        assert f"lost rank {rank} on host {socket.gethostname()}" in err, err
        assert f"run.peer_timeout_s={TIMEOUT_S}s" in err and "Traceback" not in err, err
    print(f"{signal.Signals(sig).name} of rank {rank}: job ended {took:.1f}s later")

    finished = _blocks(run)
    resumed = hpc(*args, np=2)
    assert f"resuming: {len(finished)} unit(s) already finished" in resumed.stderr
    assert all(_blocks(run)[name] == kept for name, kept in finished.items())  # never retrained
    report = json.loads((run / "report.json").read_text())
    assert {f"block-{b['index']:03d}-{b['candidate']}.pt" for b in report["blocks"] if b["resumed_finished"]} == set(finished)


def test_lost_peer_message_and_setting():
    lost = PeerLost((LostPeer(3, "node2", 301.4),), 300)
    assert "lost rank 3 on host node2 (silent for 301s)" in str(lost) and "run.peer_timeout_s=300s" in str(lost)
    assert load_config("tiny").run.peer_timeout_s == 300
    assert heartbeat_period(300) == 5 and heartbeat_period(3) == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="peer_timeout_s"):
        load_config("tiny", ["run.peer_timeout_s=-1"])


HEARTBEAT_PROBE = """
import json, socket, time
from mpi4py import MPI
from hpc_bkd.distributed.peers import Heartbeat
comm = MPI.COMM_WORLD
beat = Heartbeat(comm, socket.gethostname(), timeout_s={timeout})
time.sleep({idle})
wall, sent, cpu = time.monotonic() - beat.started, dict(beat.beats_sent), beat.cpu_s
comm.Barrier()
beat.close()
rows = comm.gather(dict(rank=comm.rank, wall=wall, sent=sent, cpu=cpu, period=beat.period_s))
if comm.rank == 0:
    print(json.dumps(rows))
"""


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 8])
def test_the_heartbeat_beats_once_per_period_and_costs_almost_no_cpu(tmp_path: Path, ranks: int):
    """Issue 20: an idle job's heartbeat sends at most one beat per peer per period (it once
    answered every beat it heard, so two ranks bounced beats as fast as they could: a third of a
    core each) and its thread's CPU time stays under 1 % of the wall time, 8 ranks on 2 cores too."""
    script = tmp_path / "probe.py"
    script.write_text(HEARTBEAT_PROBE.format(timeout=2.0, idle=3.0))
    proc = subprocess.run([str(MPIRUN), "-np", str(ranks), sys.executable, str(script)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == ranks
    for row in rows:
        peers = ranks - 1 if row["rank"] == 0 else 1
        assert len(row["sent"]) == peers, row
        most = row["wall"] / row["period"] + 2  # one at the start, one per period, one of slack
        assert all(0 < n <= most for n in row["sent"].values()), row
        assert row["cpu"] < 0.01 * row["wall"], row
    print({r["rank"]: (max(r["sent"].values()), round(r["cpu"], 4), round(r["wall"], 2)) for r in rows})
