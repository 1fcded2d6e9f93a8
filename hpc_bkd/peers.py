"""Never a silent hang: each rank hears from its peers, and one that goes silent is named.

A rank that dies (SIGKILL, OOM killer, a failed node) leaves the others waiting in their next
collective. ``mpirun`` (MPICH hydra) tears the job down at once, but ``srun`` without
``--kill-on-bad-exit`` (SLURM's default) and hydra's ``-disable-auto-cleanup`` leave them waiting
until the time limit. A plain deadline on waits cannot tell a dead peer from a busy one (rank 0
trains the teacher or fine-tunes for hours while the others wait), so every rank runs a
``Heartbeat``: a daemon thread that says "alive" every few seconds on a communicator of its own,
whatever the main thread is doing. Rank 0 hears every rank, the others hear rank 0 (2(n-1)
messages per period, not n^2). A peer silent for ``run.peer_timeout_s`` is lost: the thread asks
this rank to stop (its training loop saves, as on SIGTERM), rank 0 tells the others, and the
rank's next wait for its peers (``Runtime.idle_wait``) raises ``PeerLost`` naming the lost ranks
and hosts. A main thread stuck where it cannot notice (inside a team's allreduce with the lost
rank) is ended by the thread after a grace period, with the same message.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .cli_args import EXIT_PEER_LOST
from .runtime import Runtime, request_stop

log = logging.getLogger("hpc_bkd")

_BEAT, _LOST = 1, 2  # message tags on the heartbeat's own communicator


@dataclass(frozen=True)
class LostPeer:
    """A rank this rank stopped hearing from, where it ran, and for how long it was silent."""

    rank: int
    host: str
    silent_s: float

    def describe(self) -> str:
        return f"rank {self.rank} on host {self.host} (silent for {self.silent_s:.0f}s)"


class PeerLost(RuntimeError):
    """Peers stopped answering (died, killed, node lost): this rank saved what it had and stops."""

    def __init__(self, lost: tuple[LostPeer, ...], timeout_s: float) -> None:
        super().__init__(lost, timeout_s)
        self.lost, self.timeout_s = lost, timeout_s

    def __str__(self) -> str:
        return (f"{lost_line(self.lost, self.timeout_s)}; this rank saved its finished blocks and checkpoints "
                "and stops; run the same command again to resume")


def lost_line(lost: tuple[LostPeer, ...], timeout_s: float) -> str:
    """Which peers were lost, and by which rule: the start of every message about them."""
    return (f"lost {', '.join(p.describe() for p in lost)}: no heartbeat within run.peer_timeout_s={timeout_s:g}s "
            "(the process died, hangs, or its node failed)")


def heartbeat_period(timeout_s: float) -> float:
    """Seconds between heartbeats: a tenth of the timeout (a few missed beats are not a loss),
    at least 0.1 s and at most 5 s (rank 0 sends one message per peer per period)."""
    return min(5.0, max(0.1, timeout_s / 10))


class Heartbeat:
    """The heartbeat thread of one rank (see the module's docstring). Start it on every rank at
    once (it duplicates ``comm`` and gathers the host names: collectives); ``close`` at the end."""

    def __init__(self, comm: Any, host: str, timeout_s: float) -> None:
        from mpi4py import MPI

        self.comm = comm.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)  # a send to a dead peer must not abort this rank
        self.hosts: list[str] = self.comm.allgather(host)
        self.rank, self.timeout_s = self.comm.rank, timeout_s
        self.period_s = heartbeat_period(timeout_s)
        self.grace_s = min(timeout_s, 60.0)
        watched = range(1, self.comm.size) if self.rank == 0 else [0]
        self.heard = {r: time.monotonic() for r in watched}
        self.lost: tuple[LostPeer, ...] = ()
        self._lost_at = 0.0
        self._sends: list[Any] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpc_bkd-heartbeat", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise ``PeerLost`` once a peer is known lost (called by the main thread while it waits)."""
        if self.lost:
            raise PeerLost(self.lost, self.timeout_s)

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=10 * self.period_s)

    def _run(self) -> None:
        while not self._done.wait(self.period_s):
            try:
                self._beat()
                self._hear()
                self._judge(time.monotonic())
            except Exception as exc:  # an MPI error on this communicator: the silence will tell
                log.debug("heartbeat: %r", exc)

    def _send(self, dest: int, tag: int, payload: Any = None) -> None:
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends.append(self.comm.isend(payload, dest=dest, tag=tag))

    def _beat(self) -> None:
        for peer in self.heard:
            if not any(p.rank == peer for p in self.lost):
                self._send(peer, _BEAT)

    def _hear(self) -> None:
        from mpi4py import MPI

        status = MPI.Status()
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            payload = self.comm.recv(source=status.Get_source(), tag=status.Get_tag())
            if status.Get_tag() == _LOST and not self.lost:
                self._declare(tuple(LostPeer(*p) for p in payload))  # rank 0 lost someone: we stop too
            self.heard[status.Get_source()] = time.monotonic()

    def _judge(self, now: float) -> None:
        """Declare the peers silent for longer than the timeout lost; end the process if the main
        thread has not left within the grace period since."""
        if self.lost:
            if now - self._lost_at > self.grace_s:
                self._exit_stuck()
            return
        silent = [LostPeer(r, self.hosts[r], now - t) for r, t in self.heard.items() if now - t > self.timeout_s]
        if silent:
            self._declare(tuple(silent))
            if self.rank == 0:
                for peer in self.heard:
                    if all(p.rank != peer for p in silent):
                        self._send(peer, _LOST, [(p.rank, p.host, p.silent_s) for p in silent])

    def _declare(self, lost: tuple[LostPeer, ...]) -> None:
        self.lost, self._lost_at = lost, time.monotonic()
        log.error("%s; saving what this rank has and stopping", lost_line(lost, self.timeout_s))
        request_stop()  # the training loop saves at its next step, then waits for peers and raises

    def _exit_stuck(self) -> None:
        print(f"hpc-bkd: [rank {self.rank}/{self.comm.size}] error: {lost_line(self.lost, self.timeout_s)}; this "
              f"rank still waited on it {self.grace_s:.0f}s later (in a team's collective) and ends without saving "
              "its current step (finished blocks and earlier checkpoints are kept); run the same command again "
              "to resume", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)


@contextmanager
def watching_peers(rt: Runtime, timeout_s: float) -> Iterator[None]:
    """Run the body with a ``Heartbeat`` in ``rt.peers`` (every rank enters at once; nothing for
    one rank or ``timeout_s`` 0), so that ``rt``'s waits raise ``PeerLost`` instead of hanging."""
    if rt.size == 1 or timeout_s <= 0:
        yield
        return
    rt.peers = Heartbeat(rt.comm, rt.host, timeout_s)
    try:
        yield
    finally:
        rt.peers.close()
        rt.peers = None
