"""The paper's acceptance rule (``select.method: tolerance``): a block keeps its student when the
teacher with only that block swapped stays within ``distill.accept_tolerance`` points of the
teacher's validation accuracy. Torch-free; ``options`` applies it, ``solver`` is the other method
(the exact choice under a budget).
"""
from __future__ import annotations


def accept_blocks(block_accs: dict[int, float | None], teacher_val_acc: float, tolerance: float) -> list[int]:
    """Blocks whose swapped validation accuracy stays within ``tolerance`` points of the teacher's."""
    return sorted(i for i, acc in block_accs.items() if acc is not None and acc >= teacher_val_acc - tolerance)
