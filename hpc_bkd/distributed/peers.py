"""Never a silent hang: each rank hears from its peers, and one that goes silent is named.

A rank that dies (SIGKILL, OOM killer, a failed node) leaves the others waiting in their next
collective. ``mpirun`` (MPICH hydra) tears the job down at once, but ``srun`` without
``--kill-on-bad-exit`` (SLURM's default) and hydra's ``-disable-auto-cleanup`` leave them waiting
until the time limit. A plain deadline on waits cannot tell a dead peer from a busy one (rank 0
trains the teacher or fine-tunes for hours while the others wait), so every rank runs a
``Heartbeat``: a daemon thread that says "alive" every few seconds, whatever the main thread is
doing. Rank 0 hears every rank, the others hear rank 0 (2(n-1) messages per period, not n^2).
Beats go out on a fixed clock, one per period per peer, whatever arrives in between, so rank 0's
thread wakes n-1 times per period and the others once: the heartbeat's cost is in the report
(``ranks[].heartbeat_cpu_s``) and bounded by a test (``tests/distributed/test_peer_loss.py``).

The heartbeat has TCP connections of its own (rank 0 listens; the others connect to an address of
rank 0's that they reach, ``netaddr``), not MPI: MPI libraries do not survive talking to a dead
peer. The bundled MPICH's UCX network module crashes the surviving ranks with SIGSEGV as soon as a
peer's connection resets, its OFI module aborts them, and neither says who was lost. A socket
instead reads end-of-file the moment a peer's process ends, so a dead rank is known at once; a peer
silent for ``run.peer_timeout_s`` (a hung process, a node gone from the network) is lost too.

A lost peer stops this rank (its training loop saves, as on SIGTERM); rank 0 tells the others; the
rank's next wait for its peers (``Runtime.idle_wait``) raises ``PeerLost`` naming the lost ranks
and hosts before touching MPI. A main thread stuck where it cannot notice (inside a team's
allreduce with the lost rank) is ended by the thread after a grace period, with the same message.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hpc_bkd.distributed.netaddr import LOOPBACK, dial, offered_addresses
from hpc_bkd.distributed.runtime import Runtime, request_stop
from hpc_bkd.errors import EXIT_PEER_LOST, UserError

log = logging.getLogger("hpc_bkd")

CONNECT_TIMEOUT_S = 10.0  # a rank reaching rank 0's heartbeat, per address
_BEAT, _BYE, _LOST = b"B", b"X", b"L"  # one message per line: beat, leaving normally, lost peers (+ JSON)


@dataclass(frozen=True)
class LostPeer:
    """A rank this rank stopped hearing from, where it ran, and for how long it was silent
    (``ended``: its connection closed, i.e. its process is gone)."""

    rank: int
    host: str
    silent_s: float
    ended: bool = False

    def describe(self) -> str:
        how = "its process ended" if self.ended else f"silent for {self.silent_s:.0f}s"
        return f"rank {self.rank} on host {self.host} ({how})"


class PeerLost(UserError, RuntimeError):
    """Peers stopped answering (died, killed, node lost): this rank saved what it had and stops."""

    exit_code = EXIT_PEER_LOST

    def __init__(self, lost: tuple[LostPeer, ...], timeout_s: float) -> None:
        super().__init__(lost, timeout_s)
        self.lost, self.timeout_s = lost, timeout_s

    def __str__(self) -> str:
        return (f"{lost_line(self.lost, self.timeout_s)}; this rank saved its finished blocks and checkpoints "
                "and stops; run the same command again to resume")


class HeartbeatSetupError(UserError, RuntimeError):
    """Some rank could not connect to rank 0's heartbeat: names them, the addresses and the port."""


def lost_line(lost: tuple[LostPeer, ...], timeout_s: float) -> str:
    """Which peers were lost, and by which rule: the start of every message about them."""
    return (f"lost {', '.join(p.describe() for p in lost)}: its heartbeat connection closed or was silent longer "
            f"than run.peer_timeout_s={timeout_s:g}s (the process died, hangs, or its node failed)")


def heartbeat_period(timeout_s: float) -> float:
    """Seconds between heartbeats: a tenth of the timeout (a few missed beats are not a loss),
    at least 0.1 s and at most 5 s (rank 0 sends one message per peer per period)."""
    return min(5.0, max(0.1, timeout_s / 10))


def connect_to_root(comm: Any, hosts: list[str], timeout_s: float = CONNECT_TIMEOUT_S) -> dict[int, socket.socket]:
    """The heartbeat's connections: rank 0 listens, every other rank connects to the first of rank
    0's addresses it reaches (loopback when the job runs on one host). Returns {peer rank: socket}
    (all other ranks on rank 0, rank 0 elsewhere); raises ``HeartbeatSetupError`` on every rank if
    any rank could not connect. A collective: every rank calls it at once."""
    listener, offer = None, None
    if comm.rank == 0:
        listener = socket.create_server(("", 0), backlog=max(comm.size, 16))
        addresses = [LOOPBACK] if len(set(hosts)) == 1 else offered_addresses(hosts[0])
        offer = (addresses, listener.getsockname()[1])
    addresses, port = comm.bcast(offer, root=0)
    link = dial(addresses, port, timeout_s) if comm.rank else None
    if link is not None:
        link.sendall(f"{comm.rank}\n".encode())
    failed = [r for r, ok in enumerate(comm.allgather(comm.rank == 0 or link is not None)) if not ok]
    if failed:
        if listener is not None:
            listener.close()
        raise HeartbeatSetupError(
            f"ranks {failed} (on {', '.join(sorted({hosts[r] for r in failed}))}) could not connect to rank 0's "
            f"heartbeat on {hosts[0]} at {', '.join(addresses) or 'no address'} port {port} within {timeout_s:g}s; "
            "open that port range between the nodes, or set run.peer_timeout_s=0 to run without peer detection")
    if listener is None:
        assert link is not None
        return {0: link}
    return _accept_all(listener, comm.size - 1, timeout_s)


def _accept_all(listener: socket.socket, count: int, timeout_s: float) -> dict[int, socket.socket]:
    """Rank 0: the ``count`` connections already made to ``listener``, by the rank each names."""
    links = {}
    listener.settimeout(timeout_s)
    with listener:
        for _ in range(count):
            conn, _addr = listener.accept()
            conn.settimeout(timeout_s)
            rank = int(conn.makefile("rb").readline())
            links[rank] = conn
    return links


class Heartbeat:
    """The heartbeat thread of one rank (see the module's docstring). Start it on every rank at
    once (it gathers the host names and connects: collectives); ``close`` at the end."""

    def __init__(self, comm: Any, host: str, timeout_s: float) -> None:
        self.rank, self.size = comm.rank, comm.size
        self.hosts: list[str] = comm.allgather(host)
        self.links = connect_to_root(comm, self.hosts)
        for link in self.links.values():
            link.setblocking(False)
        self.timeout_s = timeout_s
        self.period_s = heartbeat_period(timeout_s)
        self.grace_s = min(timeout_s, 60.0)
        self.heard = {r: time.monotonic() for r in self.links}
        self._pending = {r: b"" for r in self.links}
        self._ended: set[int] = set()  # connection closed without a goodbye
        self._left: set[int] = set()   # said goodbye: the job ends normally there
        self.lost: tuple[LostPeer, ...] = ()
        self._lost_at = 0.0
        self.beats_sent = {r: 0 for r in self.links}  # per peer: bounded by elapsed / period_s + 1
        self.cpu_s = 0.0  # the heartbeat thread's own CPU seconds so far (time.thread_time)
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpc_bkd-heartbeat", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise ``PeerLost`` once a peer is known lost (called by the main thread while it waits)."""
        if self.lost:
            raise PeerLost(self.lost, self.timeout_s)

    def close(self) -> None:
        """Stop the thread, say goodbye (this rank leaves normally) and close the connections."""
        self._done.set()
        self._thread.join(timeout=10 * self.period_s)
        for peer in self._watched():
            self._send(peer, _BYE)
        for link in self.links.values():
            link.close()

    def _watched(self) -> list[int]:
        return [r for r in self.links if r not in self._left and r not in self._ended]

    def _run(self) -> None:
        """Beat on a fixed clock, listen in between. A beat is sent when one is due, never in
        answer to one: a loop that beat after every wake would bounce beats between two ranks as
        fast as they can be read (it once took a third of a core per rank, halving 2-rank speed)."""
        due = time.monotonic()
        while not self._done.is_set():
            try:
                now = time.monotonic()
                if now >= due:
                    self._beat()
                    due += self.period_s
                    if due <= now:  # the thread stalled: no burst of late beats to catch up
                        due = now + self.period_s
                self._hear(due - now)
                self._judge(time.monotonic())
            except Exception as exc:  # never let the watcher die quietly
                log.warning("heartbeat: %r", exc)
                self._done.wait(self.period_s)
            finally:
                self.cpu_s = time.thread_time()  # this thread's CPU time, read by the report

    def _beat(self) -> None:
        for peer in self._watched():
            if not any(p.rank == peer for p in self.lost):
                self._send(peer, _BEAT)
                self.beats_sent[peer] += 1

    def _send(self, peer: int, kind: bytes, payload: Any = None) -> None:
        """One line to ``peer``; a full buffer (the peer does not read: the silence will tell) is
        skipped, a closed connection means the peer's process is gone."""
        line = kind + (b" " + json.dumps(payload).encode() if payload is not None else b"") + b"\n"
        try:
            self.links[peer].send(line)
        except BlockingIOError:
            pass
        except OSError:
            self._ended.add(peer)

    def _hear(self, wait_s: float) -> None:
        """Read what the watched peers sent, waiting at most ``wait_s`` (this is the thread's sleep)."""
        watched = {self.links[r].fileno(): r for r in self._watched()}
        if not watched:
            self._done.wait(wait_s)
            return
        poller = select.poll()  # not select(): no limit of 1024 descriptors on rank 0 of a big job
        for fd in watched:
            poller.register(fd, select.POLLIN)
        for fd, _event in poller.poll(wait_s * 1000):
            peer = watched[fd]
            try:
                data = self.links[peer].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self._ended.add(peer)
                continue
            self._receive(peer, data)

    def _receive(self, peer: int, data: bytes) -> None:
        *lines, self._pending[peer] = (self._pending[peer] + data).split(b"\n")
        self.heard[peer] = time.monotonic()
        for line in lines:
            if line == _BYE:
                self._left.add(peer)
            elif line.startswith(_LOST) and not self.lost:  # rank 0 lost someone: we stop too
                self._declare(tuple(LostPeer(*p) for p in json.loads(line[2:])))

    def _judge(self, now: float) -> None:
        """Declare the peers whose process ended or that were silent longer than the timeout
        lost; end the process if the main thread has not left within the grace period since."""
        if self.lost:
            if now - self._lost_at > self.grace_s:
                self._exit_stuck()
            return
        lost = tuple(LostPeer(r, self.hosts[r], now - t, r in self._ended) for r, t in self.heard.items()
                     if r not in self._left and (r in self._ended or now - t > self.timeout_s))
        if lost:
            self._declare(lost)
            if self.rank == 0:
                for peer in self._watched():
                    self._send(peer, _LOST, [(p.rank, p.host, p.silent_s, p.ended) for p in lost])

    def _declare(self, lost: tuple[LostPeer, ...]) -> None:
        self.lost, self._lost_at = lost, time.monotonic()
        log.error("%s; saving what this rank has and stopping", lost_line(lost, self.timeout_s))
        request_stop()  # the training loop saves at its next step, then waits for peers and raises

    def _exit_stuck(self) -> None:
        print(f"hpc-bkd: [rank {self.rank}/{self.size}] error: {lost_line(self.lost, self.timeout_s)}; this "
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
