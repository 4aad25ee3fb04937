"""The run-time metrics agree with the official scorer's building blocks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import seqeval.metrics
from dragon_eval.evaluation import score_rsmape
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from extractor.metrics import auc, cohen_kappa, entity_f1, rsmape


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn(seed: int) -> None:
    rng = random.Random(seed)
    y = [rng.random() < 0.4 for _ in range(60)]
    s = [round(rng.random(), 1) for _ in range(60)]  # rounding makes ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s))


@pytest.mark.parametrize("linear", [False, True])
def test_kappa_matches_sklearn(linear: bool) -> None:
    rng = random.Random(3)
    labels = ["0", "1", "2", "3"]
    a = [rng.choice(labels) for _ in range(80)]
    b = [x if rng.random() < 0.6 else rng.choice(labels) for x in a]
    ours = cohen_kappa(a, b, linear=linear)
    assert ours == pytest.approx(cohen_kappa_score(a, b, weights="linear" if linear else None))


def test_rsmape_matches_dragon_eval() -> None:
    y = [10.0, None, 3.5, 0.0, 40.0]
    p = [12.0, 5.0, 3.0, 1.0, 20.0]
    official = score_rsmape(
        y_true=np.array([np.nan if v is None else v for v in y]),
        y_pred=np.array(p),
        epsilon=4,
        ignore_missing_targets=True,
    )
    assert rsmape(y, p, 4) == pytest.approx(official)


def test_entity_f1_matches_seqeval_micro() -> None:
    t = [["B-X", "I-X", "O", "B-Y"], ["O", "B-X", "O", "O"]]
    p = [["B-X", "I-X", "O", "O"], ["O", "B-X", "I-X", "B-Y"]]
    assert entity_f1(t, p, multi=False) == pytest.approx(seqeval.metrics.f1_score(t, p, average="micro"))
