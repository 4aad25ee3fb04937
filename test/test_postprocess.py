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


def mc_field(decision: str = "min_expected_cost", labels=("0", "1", "2", "3", "4")):
    from extractor.taskfiles import OutputField

    return OutputField(name="count", type="label", labels=tuple(labels), decision=decision)


def logs(probs: dict[str, float]) -> dict[str, float]:
    return {f'"{lab}"': math.log(p) if p > 0 else -math.inf for lab, p in probs.items()}


def test_ordinal_decision_takes_the_weighted_median_not_the_mode() -> None:
    from extractor.postprocess import field_value

    lik = logs({"0": 0.4, "1": 0.0, "2": 0.3, "3": 0.0, "4": 0.3})
    # expected linear cost: 0 -> 1.8, 1 -> 1.6, 2 -> 1.4, 3 -> 1.8, 4 -> 2.2
    assert field_value(mc_field(), "0", lik) == "2"
    assert field_value(mc_field("most_likely"), "0", lik) == "0"
    assert field_value(mc_field(), "3", None) == "3"  # no likelihoods: the answer stands


def test_ordinal_ranks_follow_dragon_evals_sorted_labels() -> None:
    from extractor.postprocess import min_expected_cost_label, ordinal_ranks

    labels = ["neutral", "contradiction", "entailment"]
    assert ordinal_ranks(labels) == {"contradiction": 0, "entailment": 1, "neutral": 2}
    # half on each end of the sorted order: the middle label (entailment) costs least
    assert min_expected_cost_label([0.45, 0.45, 0.10], labels) == "entailment"


def test_blend_uses_the_fields_decision_rule() -> None:
    from extractor.postprocess import blend_with_vote

    tf = Taskfile.model_validate(
        dict(
            task_names=["T"],
            label_name="single_label_multi_class_classification_target",
            instructions="x",
            fields=[{"name": "count", "type": "label", "labels": ["0", "1", "2"], "decision": "min_expected_cost"}],
        )
    )
    lik = {"count": logs({"0": 0.5, "1": 0.0, "2": 0.5})}
    assert blend_with_vote("0", lik, "1", [{"1": 1.0}], 0.2, tf) == "1"


def test_unresolved_median_is_a_clear_error() -> None:
    from extractor.postprocess import field_value
    from extractor.taskfiles import OutputField

    field = OutputField(name="v", type="number", nullable=True, missing_value="median")
    with pytest.raises(ValueError, match="not resolved from the training set"):
        field_value(field, None, None)


def marker_tf(**ner) -> Taskfile:
    return Taskfile.model_validate(
        dict(
            task_names=["T"],
            label_name="multi_label_named_entity_recognition_target",
            instructions="x",
            input={"kind": "words"},
            fields=[{"name": "entities", "type": "entities"}],
            ner={"entity_types": ["BCC"], "numbered": True, "unplaced": "first", **ner},
        )
    )


WORDS = "MICROSCOPIE : bcc groei . CONCLUSIE : I bcc . II bcc .".split()


def test_unplaced_entity_prefers_an_occurrence_after_the_marker_word() -> None:
    lost = [{"start": 99, "text": "bcc", "end": 99, "type": "BCC", "item": 1}]
    assert entities_to_tags(lost, WORDS, marker_tf())[2] == ["B-1-BCC"]  # first occurrence: the microscopy
    tags = entities_to_tags(lost, WORDS, marker_tf(unplaced_after=["conclusie"]))
    assert tags[2] == ["O"] and tags[8] == ["B-1-BCC"]


def test_unplaced_first_skips_occurrences_another_item_holds() -> None:
    ents = [
        {"start": 8, "text": "bcc", "end": 8, "type": "BCC", "item": 1},
        {"start": 99, "text": "bcc", "end": 99, "type": "BCC", "item": 2},
    ]
    tags = entities_to_tags(ents, WORDS, marker_tf(unplaced_after=["CONCLUSIE"]))
    assert tags[8] == ["B-1-BCC"] and tags[11] == ["B-2-BCC"] and tags[2] == ["O"]


def test_no_marker_in_the_report_falls_back_to_every_occurrence() -> None:
    lost = [{"start": 99, "text": "bcc", "end": 99, "type": "BCC", "item": 1}]
    words = ["bcc", "x", "bcc"]
    assert entities_to_tags(lost, words, marker_tf(unplaced_after=["CONCLUSIE"]))[0] == ["B-1-BCC"]
