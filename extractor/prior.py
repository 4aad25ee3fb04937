"""The training-set prior: the answer given when the model cannot give one.

Majority label, base rate, median value, all "O": the floor every other number is compared to.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

from extractor.dragon_io import Case
from extractor.tasktypes import TaskType, ValueKind


class Fallback(Protocol):
    """The answer for a case the model did not answer: a constant, a vote, a trained head."""

    name: str

    def __call__(self, case: Case) -> Any: ...

    def shares(self, case: Case) -> list[dict[Any, float]] | None:
        """Per label position, each label's share (what a blend mixes in); None when it has none."""


def median(values: Sequence[float]) -> float:
    """The median without overflow: statistics.median averages the middle pair as (a + b) / 2,
    which is inf for two values near the float maximum."""
    ordered = sorted(float(v) for v in values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    low, high = ordered[mid - 1], ordered[mid]
    return low / 2 + high / 2


def _column(labels: Sequence[Any], ttype: TaskType, kind: ValueKind) -> Any:
    present = [v for v in labels if v is not None]
    if kind is ValueKind.BINARY:
        return float(sum(bool(v) for v in present) / len(present)) if present else 0.5
    if kind is ValueKind.CLASS:
        counts = Counter(present)
        return min(counts, key=lambda lab: (-counts[lab], lab)) if counts else ""
    return median(present) if present else 0.0


class TrainingPrior:
    """Per-task constant answers learned from the training labels (NER: all "O")."""

    name = "prior"

    def __init__(self, train: Sequence[Case], ttype: TaskType) -> None:
        self.ttype = ttype
        self.value: Any = None
        if ttype.is_ner:
            return
        labels = [c.label for c in train]
        if ttype.multi:
            width = len(labels[0]) if labels else 0
            self.value = [_column([lab[i] for lab in labels], ttype, ttype.kind) for i in range(width)]
        else:
            self.value = _column(labels, ttype, ttype.kind)

    def __call__(self, case: Case) -> Any:
        if self.ttype.is_ner:
            n = len(case.parts or ())
            return [["O"] for _ in range(n)] if self.ttype.multi else ["O"] * n
        return list(self.value) if self.ttype.multi else self.value

    def shares(self, case: Case) -> None:
        return None  # a constant has nothing to blend
