"""The cost table the planner plans from, and ``costs.json``, the file that holds it (written by
a job's cost measurement, ``costs.measure``; read back on resume and by ``hpc-bkd plan --costs``).
Torch-free, like the planner.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_bkd.planning.inputs import InputCosts
from hpc_bkd.planning.planner import BlockCost

_FIELDS = ("teacher", "student", "forward")


@dataclass(frozen=True)
class CostTable:
    """Per-block costs for planning (the per-field median over ranks), the busiest team member's
    share of one rank's time for each team size the plan may use (``plan.TeamModel``), how they
    were obtained (measured | macs), and each rank's own figures."""

    costs: list[BlockCost]
    member_share: dict[int, float]
    cost_model: str
    per_rank: list[list[BlockCost]] = field(default_factory=list)
    inputs: InputCosts = InputCosts()  # the input pipeline and the cache's copies (the median rank's)

    @classmethod
    def combine(cls, measured: Sequence[CostTable]) -> CostTable:
        """The per-field median over ranks of every rank's measurement."""
        per_rank = [m.costs for m in measured]
        costs = [BlockCost(*(statistics.median(getattr(r[i], f) for r in per_rank) for f in _FIELDS))
                 for i in range(len(per_rank[0]))]
        shares = {m: statistics.median(t.member_share[m] for t in measured) for m in measured[0].member_share}
        inputs = InputCosts(**{f: statistics.median(getattr(m.inputs, f) for m in measured)
                               for f in InputCosts.__dataclass_fields__})
        return cls(costs, shares, measured[0].cost_model, per_rank, inputs)

    def to_json(self, unit_keys: Sequence[str], **context: Any) -> dict[str, Any]:
        """``costs.json``: the table, the units it is for (their keys) and the ``context`` it was
        measured in."""
        return {"cost_model": self.cost_model, **context, "units": list(unit_keys),
                "costs": [vars(c) for c in self.costs], "member_share": self.member_share, "inputs": vars(self.inputs),
                "per_rank": [[vars(c) for c in r] for r in self.per_rank]}

    @classmethod
    def from_json(cls, stored: dict[str, Any], unit_keys: Sequence[str]) -> CostTable | None:
        """The table ``to_json`` wrote, if it covers these units (else None: measure again).
        Raises KeyError, TypeError or ValueError on a malformed file."""
        if stored.get("units") != list(unit_keys):
            return None
        return cls([BlockCost(**c) for c in stored["costs"]],
                   {int(m): v for m, v in stored["member_share"].items()}, stored["cost_model"],
                   [[BlockCost(**c) for c in r] for r in stored.get("per_rank", [])],
                   InputCosts(**stored.get("inputs", {})))


def costs_from_json(path: str | Path) -> list[BlockCost]:
    """Per-block costs from a file: a list of seconds, or of {"teacher": s, "student": s} objects
    (optionally with "forward": s, a student forward without gradients)."""
    raw = json.loads(Path(path).read_text())
    if isinstance(raw, dict) and "costs" in raw:
        raw = raw["costs"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of per-block costs")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            out.append(BlockCost(0.0, float(item)))
        elif isinstance(item, dict) and {"teacher", "student"} <= set(item):
            out.append(BlockCost(float(item["teacher"]), float(item["student"]), float(item.get("forward", 0.0))))
        else:
            raise ValueError(f"{path}: item {i} must be a number or an object with 'teacher' and 'student' "
                             f"seconds, got {item!r}")
        if out[-1].teacher < 0 or out[-1].student < 0:
            raise ValueError(f"{path}: item {i} has a negative cost")
    return out
