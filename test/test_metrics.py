"""The run-time metrics equal dragon-eval's score for every task name dragon-eval knows."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import seqeval.metrics
from dragon_eval import DragonEval
from dragon_eval.evaluation import REGRESSION_EPSILON, TASK_TYPE

from extractor.metrics import (
    DRAGON_METRICS,
    Metric,
    MetricKind,
    dragon_score,
    get_entities,
    macro_f1,
    metric_for,
    task_score,
)
from extractor.tasktypes import TASK_TYPES, task_type


def label_name(task: str) -> str:
    """The label type of each DRAGON task (from the benchmark's task table)."""
    n = int(task[4:7])
    groups = {
        "single_label_binary_classification_target": [*range(1, 9), 101],
        "single_label_multi_class_classification_target": [*range(9, 15), 102, 103],
        "multi_label_binary_classification_target": [15, 16, 104],
        "multi_label_multi_class_classification_target": [17, 18, 105],
        "single_label_regression_target": [*range(19, 24), 106],
        "multi_label_regression_target": [24, 107],
        "named_entity_recognition_target": [25, 26, 108],
        "multi_label_named_entity_recognition_target": [27, 28, 109],
    }
    return next(name for name, ns in groups.items() if n in ns)


NER_TYPES = ["X", "Y", "<DATUM>", "RAPPORT-ID"]
ITEM_TYPES = ["1-lesion", "11-lesion", "2-lesion", "1-other"]  # "1-lesion" is a substring of "11-lesion"


def _tag(rng: random.Random, types: list[str]) -> str:
    r = rng.random()
    return "O" if r < 0.5 else f"{'B' if r < 0.8 else 'I'}-{rng.choice(types)}"


def random_value(rng: random.Random, task: str, n_words: int, *, truth: bool) -> Any:
    """One random truth or prediction of the task's type (with ties, nulls, odd BIO)."""
    ttype = task_type(label_name(task))
    width = 5 if ttype.multi else 1
    classes = ["0", "1", "2", "3", "4"] if task_type(label_name(task)).kind.value == "class" else []
    if task in ("Task103_Example_mednli", "Task014_textual_entailment_clf"):
        classes = ["contradiction", "entailment", "neutral"]
    if task in ("Task017_pdac_attributes_clf", "Task018_osteoarthritis_clf", "Task105_Example_ml_mc_clf"):
        classes = ["hypo", "iso", "n", "p", "0"]
    kind = ttype.kind.value
    if kind == "tags":
        if ttype.multi:
            return [sorted({_tag(rng, ITEM_TYPES) for _ in range(rng.randint(1, 2))}) for _ in range(n_words)]
        return [_tag(rng, NER_TYPES) for _ in range(n_words)]

    def one() -> Any:
        if kind == "binary":
            return rng.random() < 0.4 if truth else round(rng.random(), 1)
        if kind == "class":
            return rng.choice(classes)
        if truth and ttype.multi and rng.random() < 0.3:
            return None
        return round(rng.uniform(0, 30), 1)

    values = [one() for _ in range(width)]
    return values if ttype.multi else values[0]


def dragon_eval_scores(tmp: Path, cases: dict[str, tuple[list[Any], list[Any]]]) -> dict[str, float]:
    gt, preds = tmp / "ground-truth", tmp / "predictions"
    gt.mkdir()
    for task, (truths, predictions) in cases.items():
        name = label_name(task)
        key = name.removesuffix("_target")
        (gt / f"{task}.json").write_text(json.dumps([{"uid": str(i), name: t} for i, t in enumerate(truths)]))
        job = preds / f"{task}-fold0"
        job.mkdir(parents=True)
        rows = [{"uid": str(i), key: p} for i, p in enumerate(predictions)]
        (job / "nlp-predictions-dataset.json").write_text(json.dumps(rows))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DragonEval(
            ground_truth_path=gt, predictions_path=preds, output_file=tmp / "m.json", folds=[0], tasks=sorted(cases)
        ).evaluate()
    result = json.loads((tmp / "m.json").read_text())
    return {task: float(result["case"][task][f"{task}-fold0"]) for task in cases}


def test_table_covers_dragon_eval() -> None:
    assert set(DRAGON_METRICS) == set(TASK_TYPE)
    for task, eps in REGRESSION_EPSILON.items():
        assert DRAGON_METRICS[task] == Metric(MetricKind.RSMAPE, eps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_task_matches_dragon_eval(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    cases: dict[str, tuple[list[Any], list[Any]]] = {}
    for task in sorted(TASK_TYPE):
        truths, predictions = [], []
        for _ in range(40):
            n_words = rng.randint(3, 12)
            truths.append(random_value(rng, task, n_words, truth=True))
            predictions.append(random_value(rng, task, n_words, truth=False))
        if seed == 2 and TASK_TYPES[label_name(task)].kind.value == "class":
            predictions = truths[:]  # perfect answers
        cases[task] = (truths, predictions)
    official = dragon_eval_scores(tmp_path, cases)
    for task, (truths, predictions) in cases.items():
        ttype = task_type(label_name(task))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = dragon_score(metric_for(task, ttype), ttype, truths, predictions)
        assert ours == pytest.approx(official[task], abs=1e-9, nan_ok=True), task


def test_metric_differences_that_matter() -> None:
    """Linear kappa, fixed epsilons and per-label AUC differ from the old pooled rules."""
    ttype = task_type("single_label_multi_class_classification_target")
    truth, pred = ["0", "1", "2", "3", "4"] * 4, ["1", "2", "3", "4", "4"] * 4
    linear = task_score(ttype, truth, pred, task_name="Task010_prostate_radiology_clf")
    plain = task_score(ttype, truth, pred, task_name="Task009_pdac_diagnosis_clf")
    assert linear > plain
    reg = task_score(task_type("single_label_regression_target"), [0.1, 0.2], [0.2, 0.2], task_name="Task021_psad_reg")
    assert reg == pytest.approx(1 - (0.1 / (0.3 + 0.04) + 0) / 2)


def test_unknown_task_gets_its_label_type_metric() -> None:
    expected = {
        "single_label_binary_classification_target": MetricKind.AUC,
        "multi_label_binary_classification_target": MetricKind.AUC,
        "single_label_multi_class_classification_target": MetricKind.KAPPA,
        "multi_label_multi_class_classification_target": MetricKind.KAPPA,
        "single_label_regression_target": MetricKind.RSMAPE,
        "multi_label_regression_target": MetricKind.RSMAPE,
        "named_entity_recognition_target": MetricKind.MACRO_F1,
        "multi_label_named_entity_recognition_target": MetricKind.WEIGHTED_F1,
    }
    for name, ttype in TASK_TYPES.items():
        assert metric_for("Task999_new", ttype).kind is expected[name]
    ttype = task_type("single_label_regression_target")
    assert metric_for("Task999_new", ttype).epsilon is None
    # epsilon from the truths: 0.1 x the median |truth|
    assert task_score(ttype, [10.0, 10.0], [10.0, 0.0], task_name="x") == pytest.approx(1 - (10 / 11) / 2)


def test_undefined_scores_count_as_zero() -> None:
    ttype = task_type("single_label_binary_classification_target")
    assert task_score(ttype, [True, True], [0.2, 0.9]) == 0.0
    ner = task_type("named_entity_recognition_target")
    assert math.isnan(dragon_score(metric_for("", ner), ner, [["O"]], [["O"]]))
    assert task_score(ner, [["O"]], [["O"]]) == 0.0


def test_entity_reading_matches_seqeval() -> None:
    rng = random.Random(7)
    for _ in range(50):
        t = [[_tag(rng, ["A", "B-C"]) for _ in range(rng.randint(1, 8))] for _ in range(3)]
        p = [[_tag(rng, ["A", "B-C"]) for _ in seq] for seq in t]
        assert get_entities(t) == seqeval.metrics.sequence_labeling.get_entities(t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = seqeval.metrics.f1_score(t, p, average="macro")
        assert macro_f1(t, p) == pytest.approx(expected, nan_ok=True)
