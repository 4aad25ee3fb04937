"""DRAGON's own metric for each task, for choosing settings and heads on the validation set.

Mirrors `dragon-eval` (`dragon_eval/evaluation.py`): the per-task metric table, the fixed R-SMAPE
epsilons, pooled AUC and kappa over label positions (mean of per-label AUCs for Task015), linear
kappa on ordinal tasks, seqeval macro F1 for single-label NER and the ground-truth-weighted F1
over entity types for multi-label NER. scikit-learn computes AUC and kappa, as in dragon-eval;
seqeval's entity reading is reimplemented here (seqeval is a test tool, not in the image).
`test/test_metrics.py` checks every task name dragon-eval knows against dragon-eval itself.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from extractor.tasktypes import TaskType, ValueKind


class MetricKind(str, Enum):
    AUC = "AUC (pooled over label positions)"
    AUC_PER_LABEL = "mean of per-label AUCs"
    KAPPA = "unweighted Cohen's kappa (pooled over label positions)"
    LINEAR_KAPPA = "linear Cohen's kappa"
    RSMAPE = "R-SMAPE (pooled, missing truths skipped)"
    MACRO_F1 = "seqeval macro F1"
    WEIGHTED_F1 = "per-entity-type F1 weighted by ground-truth count"


@dataclass(frozen=True)
class Metric:
    kind: MetricKind
    epsilon: float | None = None  # R-SMAPE only; None: 0.1 x the median |truth| (unknown tasks)


_AUC, _AUC1 = Metric(MetricKind.AUC), Metric(MetricKind.AUC_PER_LABEL)
_K, _LK = Metric(MetricKind.KAPPA), Metric(MetricKind.LINEAR_KAPPA)
_MF1, _WF1 = Metric(MetricKind.MACRO_F1), Metric(MetricKind.WEIGHTED_F1)


def _reg(eps: float) -> Metric:
    return Metric(MetricKind.RSMAPE, eps)


# dragon-eval 0.2.11's TASK_TYPE and R-SMAPE epsilons, task by task.
DRAGON_METRICS: dict[str, Metric] = {
    "Task101_Example_sl_bin_clf": _AUC,
    "Task102_Example_sl_mc_clf": _LK,
    "Task103_Example_mednli": _LK,
    "Task104_Example_ml_bin_clf": _AUC,
    "Task105_Example_ml_mc_clf": _K,
    "Task106_Example_sl_reg": _reg(4),
    "Task107_Example_ml_reg": _reg(4),
    "Task108_Example_sl_ner": _MF1,
    "Task109_Example_ml_ner": _WF1,
    **{
        t: _AUC
        for t in (
            "Task001_adhesion_clf",
            "Task002_nodule_clf",
            "Task003_kidney_clf",
            "Task004_skin_case_selection_clf",
            "Task005_recist_timeline_clf",
            "Task006_pathology_tumor_origin_clf",
            "Task007_nodule_diameter_presence_clf",
            "Task008_pdac_size_presence_clf",
            "Task016_recist_lesion_size_presence_clf",
        )
    },
    "Task009_pdac_diagnosis_clf": _K,
    "Task010_prostate_radiology_clf": _LK,
    "Task011_prostate_pathology_clf": _LK,
    "Task012_pathology_tissue_type_clf": _K,
    "Task013_pathology_tissue_origin_clf": _K,
    "Task014_textual_entailment_clf": _LK,
    "Task015_colon_pathology_clf": _AUC1,
    "Task017_pdac_attributes_clf": _K,
    "Task018_osteoarthritis_clf": _K,
    "Task019_prostate_volume_reg": _reg(4),
    "Task020_psa_reg": _reg(0.4),
    "Task021_psad_reg": _reg(0.04),
    "Task022_pdac_size_reg": _reg(4),
    "Task023_nodule_diameter_reg": _reg(4),
    "Task024_recist_lesion_size_reg": _reg(4),
    "Task025_anonymisation_ner": _MF1,
    "Task026_medical_terminology_ner": _MF1,
    "Task027_prostate_biopsy_ner": _WF1,
    "Task028_skin_pathology_ner": _WF1,
}

# A task dragon-eval does not know is scored by the metric of its label type.
_BY_TYPE: dict[tuple[ValueKind, bool], Metric] = {
    (ValueKind.BINARY, False): _AUC,
    (ValueKind.BINARY, True): _AUC,
    (ValueKind.CLASS, False): _K,
    (ValueKind.CLASS, True): _K,
    (ValueKind.NUMBER, False): Metric(MetricKind.RSMAPE),
    (ValueKind.NUMBER, True): Metric(MetricKind.RSMAPE),
    (ValueKind.TAGS, False): _MF1,
    (ValueKind.TAGS, True): _WF1,
}


def metric_for(task_name: str, ttype: TaskType) -> Metric:
    """DRAGON's metric for the task name; for an unknown name, the one of its label type."""
    return DRAGON_METRICS.get(task_name) or _BY_TYPE[(ttype.kind, ttype.multi)]


# ----- building blocks ---------------------------------------------------------------------


def auc(y_true: Sequence[Any], scores: Sequence[float]) -> float:
    """sklearn's ROC AUC; NaN when one class is missing (dragon-eval then counts 0.0)."""
    y = np.asarray([int(bool(v)) for v in y_true])
    if len(set(y.tolist())) < 2:
        return math.nan
    return float(roc_auc_score(y, np.asarray(scores, dtype=float)))


def _label_key(labels: Sequence[Any]) -> list[Any]:
    """Labels as dragon-eval sees them: pandas reads all-numeric label strings as numbers,
    which changes the order linear kappa uses ("10" after "9")."""
    try:
        numbers = [float(v) for v in labels if not isinstance(v, bool)]
    except (TypeError, ValueError):
        return [str(v) for v in labels]
    return numbers if len(numbers) == len(labels) else [str(v) for v in labels]


def cohen_kappa(a: Sequence[Any], b: Sequence[Any], *, linear: bool = False) -> float:
    """sklearn's Cohen's kappa; NaN where it is undefined (a single label on both sides)."""
    both = _label_key([*a, *b])
    ka, kb = both[: len(a)], both[len(a) :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(cohen_kappa_score(ka, kb, weights="linear" if linear else None))


def rsmape(y_true: Sequence[float | None], y_pred: Sequence[float], epsilon: float) -> float:
    """1 - mean(|y - p| / (|y| + |p| + eps)), skipping positions whose truth is missing."""
    pairs = [(float(t), float(p)) for t, p in zip(y_true, y_pred, strict=True) if t is not None and not _isnan(t)]
    if not pairs:
        return math.nan
    t, p = np.array(pairs).T
    return float(1.0 - np.mean(np.abs(t - p) / (np.abs(t) + np.abs(p) + epsilon)))


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


# seqeval 1.2.2's default (non-strict, IOB2 prefix) entity reading, verbatim in behaviour.
def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        prev_tag in ("E", "S")
        or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
        or (prev_tag not in ("O", ".") and prev_type != type_)
    )


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        tag in ("B", "S")
        or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
        or (tag not in ("O", ".") and prev_type != type_)
    )


def get_entities(sequences: Sequence[Sequence[str]]) -> list[tuple[str, int, int]]:
    """(type, first, last) word offsets over the sequences joined with an "O" between them."""
    flat = [tag for seq in sequences for tag in [*seq, "O"]]
    prev_tag, prev_type, begin = "O", "", 0
    chunks = []
    for i, chunk in enumerate([*flat, "O"]):
        tag = chunk[0] if chunk else ""
        type_ = chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


Tags = Sequence[Sequence[str]]


def _f1_per_type(true_seqs: Tags, pred_seqs: Tags) -> tuple[list[float], list[int]]:
    """seqeval's per-type F1 and ground-truth counts over the union of true and predicted types."""
    true: dict[str, set[tuple[int, int]]] = {}
    pred: dict[str, set[tuple[int, int]]] = {}
    for name, s, e in get_entities(true_seqs):
        true.setdefault(name, set()).add((s, e))
    for name, s, e in get_entities(pred_seqs):
        pred.setdefault(name, set()).add((s, e))
    scores, support = [], []
    for name in sorted(set(true) | set(pred)):
        t, p = true.get(name, set()), pred.get(name, set())
        tp = len(t & p)
        precision = tp / len(p) if p else 0.0
        recall = tp / len(t) if t else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        support.append(len(t))
    return scores, support


def macro_f1(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> float:
    """seqeval.metrics.f1_score(average="macro"); NaN when neither side has an entity."""
    scores, _ = _f1_per_type(true_tags, pred_tags)
    return float(np.mean(scores)) if scores else math.nan


def _weighted_f1(true_seqs: Sequence[Sequence[str]], pred_seqs: Sequence[Sequence[str]]) -> float:
    scores, support = _f1_per_type(true_seqs, pred_seqs)
    if not scores or sum(support) == 0:
        return 0.0
    return float(np.average(scores, weights=support))


def _select(tags: Sequence[Sequence[str]], entity: str) -> list[str]:
    # dragon-eval's select_entity_labels: a substring test ("1-x" also picks "B-11-x"), first hit
    return [next((t for t in word if entity in t), "O") for word in tags]


def multi_label_f1(true_tags: Sequence[Sequence[Sequence[str]]], pred_tags: Sequence[Sequence[Sequence[str]]]) -> float:
    """dragon-eval's score_multi_label_f1: per ground-truth entity type, seqeval weighted F1 on
    that type's tags, averaged with the type's ground-truth entity count as weight."""
    types = sorted({re.sub(r"^[BI]-", "", t) for seq in true_tags for word in seq for t in word if t != "O"})
    scores, support = [], []
    for entity in types:
        t_sel = [_select(seq, entity) for seq in true_tags]
        p_sel = [_select(seq, entity) for seq in pred_tags]
        support.append(len(get_entities(t_sel)))
        scores.append(_weighted_f1(t_sel, p_sel))
    if not scores or sum(support) == 0:
        return math.nan
    return float(np.average(scores, weights=support))


# ----- one score per task ------------------------------------------------------------------


def dragon_score(metric: Metric, ttype: TaskType, truths: Sequence[Any], predictions: Sequence[Any]) -> float:
    """DRAGON's score of predictions against truths (one value per case); NaN where
    dragon-eval's is NaN (kappa on one label, NER without entities, no truth at all)."""
    if len(truths) != len(predictions):
        raise ValueError(f"{len(truths)} truths but {len(predictions)} predictions")
    if not truths:
        return math.nan
    kind = metric.kind
    if kind is MetricKind.MACRO_F1:
        return macro_f1(truths, predictions)
    if kind is MetricKind.WEIGHTED_F1:
        return multi_label_f1(truths, predictions)
    if kind is MetricKind.AUC_PER_LABEL:
        per_label = [auc([t[i] for t in truths], [p[i] for p in predictions]) for i in range(len(truths[0]))]
        return float(np.mean([0.0 if math.isnan(v) else v for v in per_label]))
    t = [v for row in truths for v in row] if ttype.multi else list(truths)
    p = [v for row in predictions for v in row] if ttype.multi else list(predictions)
    if kind is MetricKind.AUC:
        value = auc(t, p)
        return 0.0 if math.isnan(value) else value
    if kind in (MetricKind.KAPPA, MetricKind.LINEAR_KAPPA):
        return cohen_kappa(t, p, linear=kind is MetricKind.LINEAR_KAPPA)
    eps = metric.epsilon
    if eps is None:
        present = [abs(float(v)) for v in t if v is not None]
        eps = max(0.1 * float(np.median(present)), 1e-9) if present else 1.0
    return rsmape(t, p, eps)


def task_score(ttype: TaskType, truths: Sequence[Any], predictions: Sequence[Any], *, task_name: str = "") -> float:
    """The task's DRAGON metric (by task name; by label type for an unknown name), with an
    undefined score (NaN) counted as 0.0, as the local evaluation counts it."""
    value = dragon_score(metric_for(task_name, ttype), ttype, truths, predictions)
    return 0.0 if math.isnan(value) else value
