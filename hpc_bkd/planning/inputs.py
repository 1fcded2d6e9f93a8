"""The input feed as the planner sees it: what a rank pays per batch to get its images (and to
copy the teacher cache's bytes), and how that bounds a busy rank. Both halves of the formula live
here: ``InputCosts.teacher_term`` (paid once per batch whatever a rank owns) and ``Feed.bound`` (a
rank bound by its input). The figures are measured by ``costs.inputs``; see its docstring for why
the formula is what it is. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Feed:
    """The input pipeline as the planner sees it (``input_costs``): a whole batch takes at least
    ``seconds`` to arrive, and decoding takes ``drag`` = (1 - p)/p of itself from the compute it
    overlaps (p: the compute's speed meanwhile). The teacher terms already carry seconds x drag."""

    seconds: float = 0.0
    drag: float = 0.0

    def bound(self, load: float, members: int = 1) -> float:
        """A busy team's seconds per batch with its input: max(C + I drag, I + C drag), C its
        compute and I its input (a member reads its share of the rows); monotone in ``load``."""
        if load <= 0 or self.seconds <= 0:
            return load
        feed = self.seconds / members
        compute = load - feed * self.drag
        return max(load, feed + compute * self.drag)


NO_FEED = Feed()  # data in memory: no input term


@dataclass(frozen=True)
class InputCosts:
    """What feeding the students costs on this rank (see the module's docstring)."""

    seconds: float = 0.0       # per batch the input pipeline delivers (0: data in memory)
    shared_speed: float = 1.0  # p: compute speed while the workers decode, vs alone
    store: float = 0.0         # s/byte: the cache fill's channels-last copy
    gather: float = 0.0        # s/byte: a cached step's row gather
    exchange: float = 0.0      # s/byte received: a team's exchange of the rows its members filled

    def describe(self) -> str:
        """One log line for people, or "" when there is nothing to say (data in memory, no cache)."""
        parts = []
        if self.seconds > 0:
            parts.append(f"input pipeline {self.seconds:.4f}s/batch, compute at {self.shared_speed:.2f}x of its speed "
                         "while the workers decode")
        if self.store > 0:
            parts.append(f"teacher cache copies at {1 / self.store / 2**30:.1f} GiB/s (fill), "
                         f"{1 / max(self.gather, 1e-15) / 2**30:.1f} GiB/s (gather)"
                         + (f", team row exchange {1 / self.exchange / 2**30:.2f} GiB/s" if self.exchange > 0 else ""))
        return "; ".join(parts)

    @property
    def feed(self) -> Feed:
        """What the planner applies per rank (``plan.Feed.bound``)."""
        return Feed(self.seconds, (1 - self.shared_speed) / self.shared_speed)

    def teacher_term(self, teacher: float, members: int = 1) -> float:
        """The per-batch term a rank pays whatever it owns, with what its workers' decoding takes
        from its compute, I (1 - p)/p (a member reads only its rows: I/members); the plan's
        ``Feed.bound`` adds the data-bound side."""
        return teacher + self.seconds / members * self.feed.drag

    def cache_seconds(self, nbytes: float, epochs: int, members: int = 1) -> float:
        """Per step, a block caching ``nbytes`` per batch: the fill (this member's rows stored,
        the others' received) spread over the run's steps, and the gather of its rows."""
        fill = nbytes / members * self.store + nbytes * (members - 1) / members * self.exchange
        return fill / max(epochs, 1) + nbytes / members * self.gather
