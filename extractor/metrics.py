"""DRAGON's metrics, reimplemented on numpy for choosing settings on the validation set at run time
(the official `dragon-eval` and its scikit-learn/pandas stack are test tools, not in the image).

A test checks these against `dragon-eval` on the same predictions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from extractor.postprocess import tags_to_spans
from extractor.tasktypes import TaskType, ValueKind


def auc(y_true: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); 0.0 when one class is missing."""
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=float)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return 0.0
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(values):  # average ranks over ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def cohen_kappa(a: Sequence[Any], b: Sequence[Any], *, linear: bool = False) -> float:
    """Cohen's kappa; linear weights order the labels by sorted string, as DRAGON does."""
    labels = sorted({str(x) for x in a} | {str(x) for x in b})
    index = {lab: i for i, lab in enumerate(labels)}
    n = len(labels)
    if n < 2:
        return 0.0
    confusion = np.zeros((n, n))
    for x, y in zip(a, b, strict=True):
        confusion[index[str(x)], index[str(y)]] += 1
    if linear:
        weights = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) / (n - 1)
    else:
        weights = 1.0 - np.eye(n)
    expected = np.outer(confusion.sum(1), confusion.sum(0)) / confusion.sum()
    denom = (weights * expected).sum()
    return float(1.0 - (weights * confusion).sum() / denom) if denom else 0.0


def rsmape(y_true: Sequence[float | None], y_pred: Sequence[float], epsilon: float) -> float:
    """1 - mean(|y - p| / (|y| + |p| + eps)), skipping positions whose truth is missing."""
    pairs = [(float(t), float(p)) for t, p in zip(y_true, y_pred, strict=True) if t is not None]
    if not pairs:
        return 0.0
    return float(1.0 - np.mean([abs(t - p) / (abs(t) + abs(p) + epsilon) for t, p in pairs]))


def entity_f1(true_tags: Sequence[Any], pred_tags: Sequence[Any], *, multi: bool) -> float:
    """Micro F1 over exact entity spans (with their types), pooled over cases."""
    tp = n_true = n_pred = 0
    for t, p in zip(true_tags, pred_tags, strict=True):
        ts = {(s.start, s.end, s.label) for s in tags_to_spans(t, multi=multi)}
        ps = {(s.start, s.end, s.label) for s in tags_to_spans(p, multi=multi)}
        tp += len(ts & ps)
        n_true += len(ts)
        n_pred += len(ps)
    return 2 * tp / (n_true + n_pred) if n_true + n_pred else 0.0


def task_score(ttype: TaskType, truths: Sequence[Any], predictions: Sequence[Any], *, ordinal: bool = False) -> float:
    """The task's metric, pooled over label positions, for comparing settings on one job."""
    if ttype.is_ner:
        return entity_f1(truths, predictions, multi=ttype.multi)

    def flat(values: Sequence[Any]) -> list[Any]:
        return [v for row in values for v in row] if ttype.multi else list(values)

    t, p = flat(truths), flat(predictions)
    if ttype.kind is ValueKind.BINARY:
        return auc([bool(x) for x in t], p)
    if ttype.kind is ValueKind.CLASS:
        return cohen_kappa(t, p, linear=ordinal)
    scale = np.median([abs(x) for x in t if x is not None]) if any(x is not None for x in t) else 1.0
    return rsmape(t, p, epsilon=max(float(scale) * 0.1, 1e-9) if math.isfinite(scale) else 1.0)
