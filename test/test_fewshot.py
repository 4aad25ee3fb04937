from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from conftest import write_job

from extractor.backend import PlainTokenizer
from extractor.dragon_io import Case, load_job
from extractor.fewshot import NeighbourVote, Retriever, example_picker, fixed_examples
from extractor.postprocess import blend_with_vote
from extractor.prompts import PromptBuilder, render_example
from extractor.taskfiles import taskfile_for_job
from extractor.tasktypes import task_type

BIN = task_type("single_label_binary_classification_target")
MC = task_type("single_label_multi_class_classification_target")
NER = task_type("named_entity_recognition_target")


def cases(texts_labels) -> tuple[Case, ...]:
    return tuple(Case(uid=f"t{i}", text=t, label=lab) for i, (t, lab) in enumerate(texts_labels))


TRAIN = cases(
    [
        ("liver cyst of 3 cm", "cyst"),
        ("kidney stone left", "stone"),
        ("liver cyst again small", "cyst"),
        ("lung nodule right", "nodule"),
        ("kidney stone right side", "stone"),
    ]
)


def test_retrieval_finds_similar_reports_deterministically() -> None:
    r = Retriever(TRAIN)
    assert r.nearest(Case("q", text="a cyst in the liver"), 2) == [0, 2]
    assert r.nearest(Case("q", text="a cyst in the liver"), 2) == [0, 2]
    # no overlap at all: ties broken by training order
    assert r.nearest(Case("q", text="zzz"), 3) == [0, 1, 2]


def test_retrieval_never_sees_the_validation_set(tmp_path: Path) -> None:
    label = "single_label_multi_class_classification_target"
    train = [{"uid": f"t{i}", "text": f"kidney report {i}", label: "a"} for i in range(3)]
    validation = [{"uid": "v0", "text": "liver liver liver", label: "b"}]
    job = load_job(write_job(tmp_path, label_name=label, train=train, validation=validation, test=[]))
    picker = example_picker("retrieved", 4, job.train, job.task_type, Retriever(job.train))
    chosen = picker(Case("q", text="liver liver liver"))
    assert {c.uid for c in chosen} == {"t0", "t1", "t2"}


def test_retrieved_examples_put_the_nearest_last() -> None:
    picker = example_picker("retrieved", 2, TRAIN, MC, Retriever(TRAIN))
    assert [c.uid for c in picker(Case("q", text="a cyst in the liver"))] == ["t2", "t0"]


def test_fixed_examples_are_label_balanced_and_shared() -> None:
    chosen = fixed_examples(TRAIN, MC, 3)
    assert sorted(TRAIN[i].label for i in chosen) == ["cyst", "nodule", "stone"]
    picker = example_picker("fixed", 3, TRAIN, MC, None)
    assert picker(Case("a", text="x")) == picker(Case("b", text="y"))


def test_no_examples_for_zero_shot_or_empty_training() -> None:
    assert example_picker("none", 4, TRAIN, MC, Retriever(TRAIN)) is None
    assert example_picker("retrieved", 4, (), MC, Retriever(())) is None


def test_neighbour_vote_for_each_kind() -> None:
    vote = NeighbourVote(TRAIN, MC, Retriever(TRAIN), 3)
    assert vote(Case("q", text="kidney stone")) == "stone"
    binary = cases([("cyst yes", True), ("cyst yes again", True), ("nothing here", False)])
    assert NeighbourVote(binary, BIN, Retriever(binary), 2)(Case("q", text="cyst")) == 1.0
    numbers = cases([("size 10 mm lesion", 10.0), ("size 12 mm lesion", 12.0), ("other text", 50.0)])
    reg = task_type("single_label_regression_target")
    assert NeighbourVote(numbers, reg, Retriever(numbers), 2)(Case("q", text="lesion size")) == 11.0


def test_neighbour_vote_for_ner_looks_up_words() -> None:
    train = (Case("t", parts=("cyst", "in", "liver"), label=["B-X", "O", "B-ORG"]),)
    vote = NeighbourVote(train, NER, Retriever(train), 1)
    assert vote(Case("q", parts=("Liver", "cyst", "seen"))) == ["B-ORG", "B-X", "O"]


def test_blend_mixes_probabilities_and_breaks_label_ties(tmp_path: Path) -> None:
    label = "single_label_binary_classification_target"
    job = load_job(write_job(tmp_path, label_name=label, train=[{"uid": "a", "text": "x", label: True}], test=[]))
    tf = taskfile_for_job(job.config, job.train, {})
    assert blend_with_vote(0.2, {}, 1.0, [], 0.5, tf) == pytest.approx(0.6)
    assert blend_with_vote(0.2, {}, 1.0, [], 0.0, tf) == 0.2


@pytest.mark.parametrize("side, kept", [("left", "END"), ("right", "START")])
def test_examples_render_with_their_exact_answer_and_are_capped(tmp_path: Path, side: str, kept: str) -> None:
    label = "single_label_multi_class_classification_target"
    train = [{"uid": "a", "text": "START " + "x " * 1000 + "END", label: "cyst"}]
    job = load_job(write_job(tmp_path, label_name=label, train=train, test=[]))
    tf = taskfile_for_job(job.config, job.train, {})
    text, answer = render_example(job.train[0], tf, side)
    assert len(text) <= tf.examples.max_chars and kept in text
    assert orjson.loads(answer) == {"answer": "cyst"}


def test_ner_example_keeps_only_entities_it_shows(tmp_path: Path) -> None:
    label = "named_entity_recognition_target"
    words = ["cyst"] + ["w"] * 600 + ["stone"]
    tags = ["B-X"] + ["O"] * 600 + ["B-Y"]
    job = load_job(
        write_job(
            tmp_path,
            label_name=label,
            input_name="text_parts",
            train=[{"uid": "a", "text_parts": words, label: tags}],
            test=[],
        )
    )
    tf = taskfile_for_job(job.config, job.train, {})
    text, answer = render_example(job.train[0], tf, "left")
    entities = orjson.loads(answer)["entities"]
    assert "[601]stone" in text and [e["type"] for e in entities] == ["Y"] and entities[0]["start"] == 601


def test_examples_are_dropped_before_the_report_is_cut(tmp_path: Path) -> None:
    label = "single_label_multi_class_classification_target"
    train = [{"uid": f"t{i}", "text": "cyst " * 100, label: "cyst"} for i in range(4)]
    job = load_job(write_job(tmp_path, label_name=label, train=train, test=[]))
    tf = taskfile_for_job(job.config, job.train, {})
    picker = example_picker("fixed", 4, job.train, job.task_type, None)
    wide = PromptBuilder(tf, PlainTokenizer(), truncation_side="left", context_limit=100_000, examples=picker)
    assert wide.build(Case("q", text="report"), reasoning=False, max_tokens=50).examples == 4
    narrow = PromptBuilder(tf, PlainTokenizer(), truncation_side="left", context_limit=2600, examples=picker)
    plan = narrow.build(Case("q", text="report"), reasoning=False, max_tokens=50)
    assert 0 < plan.examples < 4 and not plan.truncated and "report" in plan.request.prompt


def test_bm25s_logs_at_the_runs_level() -> None:
    import logging

    import extractor.fewshot  # noqa: F401 - importing it sets the level

    root = logging.getLogger()
    old = root.level
    try:
        root.setLevel(logging.INFO)
        assert not logging.getLogger("bm25s").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(old)


def test_the_median_of_huge_values_does_not_overflow() -> None:
    from extractor.prior import median

    assert median([1e308, 1e308]) == 1e308 and median([-1e308, 1e308]) == 0.0 and median([3, 1, 2]) == 2
