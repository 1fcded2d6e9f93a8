"""Candidate students and the units of distillation work they make.

A *candidate* is one kind of student block, named by a short readable string that is also its
file name and its identity in reports: ``separable-d2`` (the paper's two stacked depthwise-separable
layers), ``separable-d1``, ``separable-d2-w0.5`` (half the hidden width), ``lowrank-r0.25`` (a 3x3
convolution to a quarter of the output channels, then a 1x1 convolution back: two dense operators,
which is what small tensors on a CPU reward), ``skip`` (the block removed: identity, or the cheapest
shape-matching projection where the block changes shape), ``shrink-w0.5`` (the teacher's own unit
with its internal widths halved, started from the teacher's weights). Every (block, candidate) pair
that applies to the block is a *unit*: an independent distillation job with its own seed, checkpoint
and result, planned like a block.

Torch-free, so configs are checked and plans made without it (the modules are built by each
kind's builder, ``students.py`` for the built-in ones). A new kind is one :func:`register_kind`.
"""
from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hpc_bkd.errors import UserError

TEACHER = "teacher"  # the option of keeping the teacher's own block: never trained, always valid


@dataclass(frozen=True)
class Kind:
    """A kind of candidate: its parameters (one letter each, with defaults), what it is, and the
    function that builds its student block.

    The builder is named ``"module:function"`` and imported only when a student is built, so that
    kinds stay torch-free data (configs are checked and plans made without torch). It is called as
    ``builder(spec, params, teacher)`` and returns a function making the student's modules (see
    ``students.Builder``); it raises ``whole_units.NotApplicable`` for a block the kind does not fit.
    """

    name: str
    params: dict[str, float]
    integer: tuple[str, ...]
    about: str
    fractions: tuple[str, ...] = ()  # parameters that must lie in (0, 1)
    builder: str = ""  # "module:function", e.g. "hpc_bkd.blocks.students:separable"

    def example(self) -> str:
        return Candidate(self.name, dict(self.params)).name

    def load_builder(self) -> Callable[..., Any]:
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Make ``kind`` a valid candidate kind (``blocks.candidates``) in this process; returns it."""
    if ":" not in kind.builder:
        raise ValueError(f"candidate kind {kind.name!r}: builder must be 'module:function', got {kind.builder!r}")
    KINDS[kind.name] = kind
    return kind


_STUDENTS = "hpc_bkd.blocks.students"
for _kind in (
    Kind("separable", {"d": 2, "w": 1.0}, ("d",),
         "d stacked 3x3 depthwise + 1x1 pointwise layers, hidden width w x the output channels",
         builder=f"{_STUDENTS}:separable"),
    Kind("lowrank", {"r": 0.25}, (),
         "3x3 conv to r x the output channels, then a 1x1 conv back (two dense operators)",
         builder=f"{_STUDENTS}:lowrank"),
    Kind("skip", {}, (),
         "the block removed: identity where its input and output shapes match, else a strided 1x1 conv + BN "
         "(maps) or a linear map + LayerNorm (tokens)", builder=f"{_STUDENTS}:skip"),
    Kind("shrink", {"w": 0.5}, (),
         "the teacher's own unit with its internal widths cut to w, initialised from its weights (unit granularity)",
         fractions=("w",), builder=f"{_STUDENTS}:shrink"),
):
    register_kind(_kind)


class CandidateError(UserError, ValueError):
    """A candidate name that cannot be parsed; the message lists the valid kinds."""


def _valid_kinds() -> str:
    return "; ".join(f"{k.name} (e.g. {k.example()}: {k.about})" for k in KINDS.values())


@dataclass(frozen=True)
class Candidate:
    """A parsed candidate: its kind and every parameter (defaults filled in)."""

    kind: str
    params: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The canonical name, so one student has one name: the kind's first parameter always,
        the others where they differ from their defaults."""
        kind = KINDS[self.kind]
        first = next(iter(kind.params), None)
        parts = [f"{p}{int(v) if p in kind.integer else format(v, 'g')}" for p, v in self.params.items()
                 if p == first or v != kind.params[p]]
        return "-".join([self.kind, *parts])

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """``separable-d1``, ``separable-d2-w0.5``, ``lowrank-r0.25`` (omitted parameters default)."""
        kind_name, *parts = text.strip().split("-")
        kind = KINDS.get(kind_name)
        if kind is None:
            raise CandidateError(f"unknown candidate kind {kind_name!r} in {text!r}; valid kinds: {_valid_kinds()}")
        params = dict(kind.params)
        for part in parts:
            key, value = part[:1], part[1:]
            if key not in kind.params:
                raise CandidateError(f"candidate {text!r}: {kind.name} takes {', '.join(kind.params) or 'no parameters'} "
                                     f"(e.g. {kind.example()}), not {part!r}")
            try:
                number = int(value) if key in kind.integer else float(value)
            except ValueError:
                raise CandidateError(f"candidate {text!r}: {key} must be a number, got {value!r}") from None
            if number <= 0:
                raise CandidateError(f"candidate {text!r}: {key} must be > 0")
            if key in kind.fractions and number >= 1:
                raise CandidateError(f"candidate {text!r}: {key} must be below 1 (a fraction of the teacher's width)")
            params[key] = number
        return cls(kind.name, params)


def parse_candidates(names: Sequence[str]) -> list[Candidate]:
    """Parsed, de-duplicated candidates in the order given (``teacher`` is implicit, never listed)."""
    out: list[Candidate] = []
    for text in names:
        if text.strip() == TEACHER:
            raise CandidateError("'teacher' (keeping the teacher's block) is always an option; do not list it")
        cand = Candidate.parse(text)
        if cand.name not in [c.name for c in out]:
            out.append(cand)
    return out


def paper_candidate(depth: int, width: float) -> Candidate:
    """The single candidate of a job that lists none: ``blocks.student_depth`` / ``student_width``."""
    return Candidate("separable", {"d": depth, "w": width})


@dataclass(frozen=True)
class Unit:
    """One distillation job: block ``block``'s student of kind ``candidate``. ``id`` numbers units
    block-major (block x candidates + k), the numbering plans and schedules use."""

    id: int
    block: int
    candidate: str

    @property
    def key(self) -> str:
        """Its name in the run directory and the logs: ``003-separable-d2``."""
        return f"{self.block:03d}-{self.candidate}"


def job_units(blocks: int, candidates: Sequence[Candidate],
              applies: Callable[[int, Candidate], bool] | None = None) -> list[Unit]:
    """Every (block, candidate) unit of a job, block-major, numbered in that order; ``applies``
    leaves out the pairs whose kind does not fit the block (``students.applies``)."""
    pairs = [(b, c) for b in range(blocks) for c in candidates if applies is None or applies(b, c)]
    return [Unit(i, b, c.name) for i, (b, c) in enumerate(pairs)]


def block_seed(seed: int, index: int) -> int:
    """The seed of one block: from the global seed and the block index, never the rank."""
    return (seed * 1_000_003 + 7919 * (index + 1)) % (2**31 - 1)


def unit_seed(seed: int, block: int, candidate: str) -> int:
    """A unit's seed: from the global seed, the block index and the candidate's name, never the
    rank, so a unit trains the same wherever the plan puts it."""
    return (block_seed(seed, block) + 104_729 * zlib.crc32(candidate.encode())) % (2**31 - 1)
