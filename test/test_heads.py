"""Trained heads on jobs large enough to learn from: valid shapes, real learning, determinism,
no use of validation or test labels, and the too-small / one-class fallbacks."""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from extractor.dragon_io import Case, Job, load_job, verify_predictions
from extractor.heads import (
    ClassificationHead,
    EmbeddingHead,
    find_numbers,
    repair_bio,
    repair_multi,
    train_heads,
)
from extractor.metrics import task_score
from extractor.prior import TrainingPrior
from extractor.tasktypes import task_type

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_learnable_jobs import JOBS, write_jobs  # noqa: E402

# The best head's validation score must clear these (the prior scores 0.5 AUC, 0 kappa/F1).
FLOOR = {
    "Task101_Example_sl_bin_clf": 0.95,
    "Task102_Example_sl_mc_clf": 0.8,
    "Task103_Example_mednli": 0.9,
    "Task104_Example_ml_bin_clf": 0.95,
    "Task105_Example_ml_mc_clf": 0.9,
    "Task106_Example_sl_reg": 0.97,
    "Task107_Example_ml_reg": 0.97,
    "Task108_Example_sl_ner": 0.9,
    "Task109_Example_ml_ner": 0.9,
}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    root = tmp_path_factory.mktemp("learnable")
    return {task: load_job(path) for task, path in write_jobs(root).items()}


@pytest.fixture(scope="module")
def trained(jobs: dict[str, Job]) -> dict[str, list]:
    return {task: train_heads(job.train, job.task_type, seed=0) for task, job in jobs.items()}


def records(job: Job, values: list) -> list[dict]:
    return [{"uid": c.uid, job.task_type.prediction_key: v} for c, v in zip(job.test, values, strict=True)]


@pytest.mark.parametrize("task", sorted(JOBS))
def test_heads_learn_and_predict_valid_values(task: str, jobs: dict[str, Job], trained: dict[str, list]) -> None:
    job, heads = jobs[task], trained[task]
    assert heads, f"{task}: no head trained"
    for head in heads:
        verify_predictions(records(job, head.predict(job.test)), job)  # raises on any invalid value
    truth = [c.label for c in job.validation]
    prior = TrainingPrior(job.train, job.task_type)
    best = max(task_score(job.task_type, truth, h.predict(job.validation), task_name=task) for h in heads)
    floor = task_score(job.task_type, truth, [prior(c) for c in job.validation], task_name=task)
    assert best >= FLOOR[task] > floor


@pytest.mark.parametrize("task", ["Task101_Example_sl_bin_clf", "Task106_Example_sl_reg", "Task109_Example_ml_ner"])
def test_deterministic(task: str, jobs: dict[str, Job], trained: dict[str, list]) -> None:
    job = jobs[task]
    again = train_heads(job.train, job.task_type, seed=0)
    assert [h.name for h in again] == [h.name for h in trained[task]]
    for a, b in zip(again, trained[task], strict=True):
        assert a.predict(job.test) == b.predict(job.test)


@pytest.mark.parametrize("task", ["Task102_Example_sl_mc_clf", "Task107_Example_ml_reg", "Task108_Example_sl_ner"])
def test_labels_of_predicted_cases_are_never_read(task: str, jobs: dict[str, Job], trained: dict[str, list]) -> None:
    """Poisoned labels on validation cases (shuffled between cases) change no prediction."""
    job = jobs[task]
    labels = [c.label for c in job.validation]
    random.Random(1).shuffle(labels)
    poisoned = [dataclasses.replace(c, label=lab) for c, lab in zip(job.validation, labels, strict=True)]
    for head in trained[task]:
        assert head.predict(poisoned) == head.predict(job.validation)


def test_training_set_decides_everything(jobs: dict[str, Job], trained: dict[str, list]) -> None:
    """Heads trained from a job whose validation labels are shuffled are the same heads."""
    job = jobs["Task104_Example_ml_bin_clf"]
    shuffled = list(job.validation)
    random.Random(2).shuffle(shuffled)
    other = dataclasses.replace(job, validation=tuple(shuffled))
    heads = train_heads(other.train, other.task_type, seed=0)
    for a, b in zip(heads, trained["Task104_Example_ml_bin_clf"], strict=True):
        assert a.predict(job.test) == b.predict(job.test)


def test_probabilities_cover_training_labels(jobs: dict[str, Job], trained: dict[str, list]) -> None:
    job = jobs["Task105_Example_ml_mc_clf"]
    head = trained["Task105_Example_ml_mc_clf"][0]
    assert isinstance(head, ClassificationHead)
    rows = head.probabilities(job.test[:5])
    train_labels = [{c.label[j] for c in job.train} for j in range(2)]
    for row in rows:
        assert len(row) == 2
        for j, probs in enumerate(row):
            assert set(probs) == train_labels[j]
            assert sum(probs.values()) == pytest.approx(1.0)
    binary = trained["Task101_Example_sl_bin_clf"][0]
    p = binary.probabilities(jobs["Task101_Example_sl_bin_clf"].test[:3])
    assert all(set(row[0]) == {True, False} for row in p)


def test_ordinal_median_decode_exists_only_for_numeric_labels(trained: dict[str, list]) -> None:
    assert any(h.name.endswith("-median") for h in trained["Task102_Example_sl_mc_clf"])
    assert not any(h.name.endswith("-median") for h in trained["Task103_Example_mednli"])


def test_too_small_training_set_falls_back(jobs: dict[str, Job], caplog: pytest.LogCaptureFixture) -> None:
    for task in ("Task101_Example_sl_bin_clf", "Task106_Example_sl_reg", "Task108_Example_sl_ner"):
        job = jobs[task]
        with caplog.at_level(logging.INFO, logger="extractor.heads"):
            assert train_heads(job.train[:9], job.task_type) == []
        assert "usable training records" in caplog.text


def test_one_class_training_set_falls_back(jobs: dict[str, Job], caplog: pytest.LogCaptureFixture) -> None:
    job = jobs["Task101_Example_sl_bin_clf"]
    same = [dataclasses.replace(c, label=True) for c in job.train]
    with caplog.at_level(logging.INFO, logger="extractor.heads"):
        assert train_heads(same, job.task_type) == []
    assert "single class" in caplog.text
    ner = jobs["Task108_Example_sl_ner"]
    all_o = [dataclasses.replace(c, label=["O"] * len(c.parts or ())) for c in ner.train]
    assert train_heads(all_o, ner.task_type) == []


def test_one_class_position_gets_its_constant(jobs: dict[str, Job], caplog: pytest.LogCaptureFixture) -> None:
    job = jobs["Task105_Example_ml_mc_clf"]
    fixed = [dataclasses.replace(c, label=["links", c.label[1]]) for c in job.train]
    with caplog.at_level(logging.INFO, logger="extractor.heads"):
        heads = train_heads(fixed, job.task_type)
    assert "position 0 has a single training class" in caplog.text
    values = heads[0].predict(job.test)
    assert {v[0] for v in values} == {"links"}
    assert len({v[1] for v in values}) == 2


def test_regression_with_nulls_and_no_number(jobs: dict[str, Job], trained: dict[str, list]) -> None:
    job = jobs["Task107_Example_ml_reg"]
    head = trained["Task107_Example_ml_reg"][0]
    no_number = Case(uid="x", text="Geen laesies gezien.")
    medians = [float(np.median([c.label[j] for c in job.train if c.label[j] is not None])) for j in range(3)]
    assert head.predict([no_number]) == [medians]


def test_dutch_decimal_commas(jobs: dict[str, Job], trained: dict[str, list]) -> None:
    assert [c.value for c in find_numbers("PSA 7,2 ng/ml, volume 45.5 cc, 3 laesies, 12mm")] == [7.2, 45.5, 3.0, 12.0]
    head = trained["Task106_Example_sl_reg"][0]
    case = Case(uid="y", text="Verslag CT. PSA 6,1 ng/ml. Prostaatvolume 52,7 cc. Leeftijd 71 jaar.")
    assert head.predict([case]) == [pytest.approx(52.7)]


def test_unit_factor_is_learned(jobs: dict[str, Job], trained: dict[str, list]) -> None:
    head = trained["Task106_Example_sl_reg"][0]
    assert head.unit_factor.get("cc") == 1.0


def test_bio_repair() -> None:
    assert repair_bio(["I-X", "I-X", "O", "I-Y", "B-X", "I-Y"]) == ["B-X", "I-X", "O", "B-Y", "B-X", "B-Y"]
    assert repair_multi([["I-1-a"], ["I-1-a", "I-2-a"], ["O"]]) == [["B-1-a"], ["B-2-a", "I-1-a"], ["O"]]


def test_ner_uses_training_tags_only(jobs: dict[str, Job], trained: dict[str, list]) -> None:
    for task in ("Task108_Example_sl_ner", "Task109_Example_ml_ner"):
        job = jobs[task]
        seen = {t for c in job.train for w in c.label for t in (w if job.task_type.multi else [w])}
        for head in trained[task]:
            for tags in head.predict(job.test):
                used = {t for w in tags for t in (w if job.task_type.multi else [w])}
                # item numbers come from markers, so a B-/I- pair of a seen type and item is expected
                assert used <= seen | {t.replace("I-", "B-") for t in seen} | {t.replace("B-", "I-") for t in seen}


def hashed_bow(texts: list[str], dim: int = 256) -> np.ndarray:
    """A fake embedder: hashed bag of words (stable across runs: no Python hash())."""
    out = np.zeros((len(texts), dim))
    for i, text in enumerate(texts):
        for word in text.lower().split():
            out[i, sum(map(ord, word)) * 31 % dim] += 1.0
    return out


def volume_signal(texts: list[str]) -> np.ndarray:
    """A fake embedder whose direction carries the stated prostate volume (for the ridge head)."""
    out = []
    for text in texts:
        after = text.split("Prostaatvolume ", 1)[-1]
        v = float(after.split()[0].replace(",", ".")) / 100 if "Prostaatvolume" in text else 0.5
        out.append([v, 1.0 - v, 0.3])
    return np.array(out)


@pytest.mark.parametrize(
    ("task", "embed"),
    [
        ("Task101_Example_sl_bin_clf", hashed_bow),
        ("Task105_Example_ml_mc_clf", hashed_bow),
        ("Task106_Example_sl_reg", volume_signal),
    ],
)
def test_embedding_head(task: str, embed, jobs: dict[str, Job]) -> None:
    job = jobs[task]
    head = EmbeddingHead(embed).fit(job.train, job.task_type, seed=0)
    assert head is not None
    verify_predictions(records(job, head.predict(job.test)), job)
    prior = TrainingPrior(job.train, job.task_type)
    truth = [c.label for c in job.validation]
    ours = task_score(job.task_type, truth, head.predict(job.validation), task_name=task)
    assert ours > task_score(job.task_type, truth, [prior(c) for c in job.validation], task_name=task) + 0.1


def test_embedding_head_refuses_ner_and_tiny_sets(jobs: dict[str, Job]) -> None:
    ner = jobs["Task108_Example_sl_ner"]
    with pytest.raises(ValueError, match="not NER"):
        EmbeddingHead(hashed_bow).fit(ner.train, task_type("named_entity_recognition_target"))
    job = jobs["Task101_Example_sl_bin_clf"]
    assert EmbeddingHead(hashed_bow).fit(job.train[:5], job.task_type) is None
    with pytest.raises(ValueError, match="shape"):
        EmbeddingHead(lambda texts: np.zeros(3)).fit(job.train, job.task_type)
