"""Addresses the ranks of a job really reach each other on (standard library only, no torch).

A host name is a poor address between nodes: it may not resolve on the others, or resolve to a
loopback address on its own node (``127.0.1.1 node1`` in many ``/etc/hosts``), and whoever connects
to it then waits until a timeout. The team rendezvous (``teams.py``) and the heartbeat
(``peers.py``) therefore have one rank offer every address of its interfaces, best first, and the
others connect to the one they reach.
"""
from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def host_addresses() -> list[tuple[str, str]]:
    """(interface, IPv4 address) of this host's interfaces that have one, loopback left out
    (Linux's SIOCGIFADDR: each interface's primary address; nothing elsewhere)."""
    import fcntl
    import struct

    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:  # down, or no IPv4 address
                continue
            addr = socket.inet_ntoa(packed[20:24])
            if not addr.startswith("127."):
                found.append((name, addr))
    return found


def offered_addresses(host: str) -> list[str]:
    """This host's addresses for peers on other nodes, best first: the one its host name resolves
    to (what a cluster's DNS says), then every other interface's. Never loopback."""
    try:
        named = [socket.gethostbyname(host)]
    except OSError:
        named = []
    ours = [a for _, a in host_addresses()]
    return list(dict.fromkeys([a for a in named if a in ours] + ours))


def reachable(candidates: list[str], port: int, timeout_s: float) -> list[str]:
    """The candidate addresses this host can open a TCP connection to on ``port`` (tried at once,
    so this takes at most ``timeout_s``)."""
    from concurrent.futures import ThreadPoolExecutor

    def connects(addr: str) -> bool:
        try:
            socket.create_connection((addr, port), timeout=timeout_s).close()
            return True
        except OSError:
            return False

    if not candidates:
        return []
    with ThreadPoolExecutor(len(candidates)) as pool:
        return [a for a, ok in zip(candidates, pool.map(connects, candidates)) if ok]


def dial(candidates: list[str], port: int, timeout_s: float) -> socket.socket | None:
    """A TCP connection to the first candidate that answers on ``port``, or None."""
    for addr in candidates:
        try:
            return socket.create_connection((addr, port), timeout=timeout_s)
        except OSError:
            continue
    return None


def interface_towards(addr: str) -> str | None:
    """The name of this host's interface that traffic to ``addr`` leaves from."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, 9))  # a UDP connect sends nothing: it only picks the route
            local = s.getsockname()[0]
        except OSError:
            return None
    return next((name for name, a in host_addresses() if a == local), None)
