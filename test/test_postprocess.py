from __future__ import annotations

import math

import pytest

from extractor.gold import label_to_answer
from extractor.postprocess import (
    entities_to_tags,
    find_spans,
    match_at,
    most_likely_label,
    probability_true,
    tags_to_spans,
    to_prediction,
)
from extractor.taskfiles import Taskfile


def ner_tf(multi: bool = False, unplaced: str = "all", max_text_chars: int = 120) -> Taskfile:
    return Taskfile.model_validate(
        dict(
            task_names=["T"],
            label_name="multi_label_named_entity_recognition_target" if multi else "named_entity_recognition_target",
            instructions="x",
            input={"kind": "words"},
            fields=[{"name": "entities", "type": "entities"}],
            ner={
                "entity_types": ["lesion", "SIZE"],
                "numbered": multi,
                "unplaced": unplaced,
                "max_text_chars": max_text_chars,
            },
        )
    )


def test_probability_from_likelihoods() -> None:
    assert probability_true({"true": math.log(0.3), "false": math.log(0.1)}, False) == pytest.approx(0.75)
    assert probability_true(None, True) == 1.0
    assert probability_true({"true": -1e9, "false": 0.0}, True) == 0.0
    assert isinstance(probability_true({"true": -2.0, "false": -1.0}, True), float)


def test_most_likely_label_stays_in_the_label_set() -> None:
    lik = {'"a"': -3.0, '"b"': -1.0, '"zzz"': 0.0}
    assert most_likely_label(lik, "a", ["a", "b"]) == "b"
    assert most_likely_label({}, "not allowed", ["a", "b"]) == "a"


def test_match_tolerates_case_and_punctuation_splits() -> None:
    words = ["Lesion", "of", "3.8", "mm", ".", "End"]
    assert match_at(words, 2, "3.8mm.") == 5
    assert match_at(words, 0, "lesionof") == 2
    assert match_at(words, 1, "lesion") is None
    assert find_spans(["a", "b", "a", "b"], "ab") == [(0, 2), (2, 4)]


def test_entity_position_decides_between_repeats() -> None:
    words = ["mass", "left", ".", "mass", "right"]
    tags = entities_to_tags([{"start": 3, "text": "mass", "end": 3, "type": "lesion"}], words, ner_tf())
    assert tags == ["O", "O", "O", "B-lesion", "O"]


def test_position_off_by_one_is_forgiven() -> None:
    words = ["a", "b", "12", "mm"]
    tags = entities_to_tags([{"start": 1, "text": "12 mm", "end": 3, "type": "SIZE"}], words, ner_tf())
    assert tags == ["O", "O", "B-SIZE", "I-SIZE"]


@pytest.mark.parametrize(
    "unplaced, expected", [("all", ["B-lesion", "O", "B-lesion"]), ("first", ["B-lesion", "O", "O"])]
)
def test_entity_without_usable_position_uses_the_taskfile_fallback(unplaced: str, expected: list[str]) -> None:
    words = ["cyst", "and", "cyst"]
    tags = entities_to_tags(
        [{"start": 40, "text": "cyst", "end": 40, "type": "lesion"}], words, ner_tf(unplaced=unplaced)
    )
    assert tags == expected


def test_abbreviated_long_entity_uses_its_end() -> None:
    words = ["x"] + ["word"] * 30
    text = " ".join(["word"] * 5)
    tf = ner_tf(max_text_chars=len(text))
    tags = entities_to_tags([{"start": 1, "text": text, "end": 30, "type": "lesion"}], words, tf)
    assert tags[0] == "O" and tags[1] == "B-lesion" and tags[30] == "I-lesion"


def test_unknown_text_is_dropped_and_lengths_match() -> None:
    words = ["a", "b"]
    assert entities_to_tags([{"start": 0, "text": "zzz", "end": 0, "type": "lesion"}], words, ner_tf()) == ["O", "O"]


def test_multilabel_tags_carry_item_numbers_and_overlap() -> None:
    words = ["I", "lesion", "of", "5", "mm"]
    ents = [
        {"start": 3, "text": "5 mm", "end": 4, "type": "SIZE", "item": 1},
        {"start": 1, "text": "lesion of 5 mm", "end": 4, "type": "lesion", "item": 1},
    ]
    tags = entities_to_tags(ents, words, ner_tf(multi=True))
    assert tags == [["O"], ["B-1-lesion"], ["I-1-lesion"], ["B-1-SIZE", "I-1-lesion"], ["I-1-SIZE", "I-1-lesion"]]


def test_tags_to_spans_reads_like_seqeval() -> None:
    spans = tags_to_spans(["I-X", "I-X", "O", "B-X", "B-X", "I-Y"], multi=False)
    assert [(s.start, s.end, s.label) for s in spans] == [(0, 2, "X"), (3, 4, "X"), (4, 5, "X"), (5, 6, "Y")]


@pytest.mark.parametrize(
    "label_name, fields, label",
    [
        ("single_label_binary_classification_target", [{"name": "a", "type": "boolean"}], True),
        (
            "multi_label_binary_classification_target",
            [{"name": "a", "type": "boolean"}, {"name": "b", "type": "boolean"}],
            [False, True],
        ),
        ("single_label_multi_class_classification_target", [{"name": "a", "type": "label", "labels": ["x", "y"]}], "y"),
        ("single_label_regression_target", [{"name": "a", "type": "number"}], 4.5),
        (
            "multi_label_regression_target",
            [{"name": "a", "type": "number", "nullable": True}, {"name": "b", "type": "number", "nullable": True}],
            [3.0, None],
        ),
    ],
)
def test_gold_answers_round_trip(label_name: str, fields: list, label) -> None:
    tf = Taskfile.model_validate(dict(task_names=["T"], label_name=label_name, instructions="x", fields=fields))
    pred = to_prediction(label_to_answer(label, None, tf), {}, tf, None)
    expected = label
    if isinstance(label, bool):
        expected = float(label)
    elif isinstance(label, list):
        expected = [float(v) if v is not None else 0.0 for v in label]
    assert pred == expected


def test_gold_ner_round_trip_keeps_repeats_untagged() -> None:
    words = ["cyst", "left", ",", "cyst", "right"]
    tags = ["B-lesion", "O", "O", "O", "O"]
    tf = ner_tf()
    assert to_prediction(label_to_answer(tags, words, tf), {}, tf, words) == tags
