from __future__ import annotations

import orjson
import pytest

from extractor.schema import AnswerError, answer_schema, parse_answer, score_choices
from extractor.taskfiles import Taskfile


def make_tf(**over) -> Taskfile:
    base = dict(
        task_names=["T"],
        label_name="multi_label_multi_class_classification_target",
        instructions="x",
        fields=[
            {"name": "side", "type": "label", "labels": ["left", "right"]},
            {"name": "grade", "type": "label", "labels": ["0", "1", "n"]},
        ],
        reasoning={"enabled": True, "max_chars": 50},
    )
    base.update(over)
    return Taskfile.model_validate(base)


NER = dict(
    label_name="multi_label_named_entity_recognition_target",
    input={"kind": "words"},
    fields=[{"name": "entities", "type": "entities"}],
    ner={"entity_types": ["lesion"], "numbered": True, "item_min": 1, "item_max": 3, "max_entities": 4},
)


def test_schema_orders_reasoning_first_and_bounds_it() -> None:
    schema = answer_schema(make_tf(), reasoning=True)
    assert list(schema["properties"]) == ["reasoning", "side", "grade"]
    assert schema["properties"]["reasoning"]["maxLength"] == 50
    assert schema["required"] == ["reasoning", "side", "grade"]
    assert "reasoning" not in answer_schema(make_tf(), reasoning=False)["properties"]


def test_ner_schema_bounds_the_list_and_the_items() -> None:
    schema = answer_schema(make_tf(**NER), reasoning=False)
    ents = schema["properties"]["entities"]
    assert ents["maxItems"] == 4
    assert ents["items"]["properties"]["item"] == {"type": "integer", "minimum": 1, "maximum": 3}
    assert list(ents["items"]["properties"]) == ["start", "text", "end", "type", "item"]


def test_choices_are_json_literals() -> None:
    assert score_choices(make_tf()) == {"side": ('"left"', '"right"'), "grade": ('"0"', '"1"', '"n"')}


def test_parse_answer_validates_and_drops_reasoning() -> None:
    text = orjson.dumps({"reasoning": "because", "side": "left", "grade": "n"}).decode()
    assert parse_answer(text, make_tf()) == {"side": "left", "grade": "n"}


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"side": "left"', "not valid JSON"),
        ('{"side": "up", "grade": "0"}', "side"),
        ('{"side": "left"}', "grade"),
        ('{"side": "left", "grade": "0", "extra": 1}', "extra"),
        ("[1]", "JSON object"),
    ],
)
def test_parse_answer_rejects_bad_output(text: str, message: str) -> None:
    with pytest.raises(AnswerError, match=message):
        parse_answer(text, make_tf())


def test_entity_item_must_be_in_range() -> None:
    tf = make_tf(**NER)
    good = {"entities": [{"start": 0, "text": "a", "end": 0, "type": "lesion", "item": 2}]}
    assert parse_answer(orjson.dumps(good).decode(), tf)["entities"][0]["item"] == 2
    bad = {"entities": [{"start": 0, "text": "a", "end": 0, "type": "lesion", "item": 7}]}
    with pytest.raises(AnswerError, match="item"):
        parse_answer(orjson.dumps(bad).decode(), tf)


def test_every_shipped_taskfile_schema_converts_to_a_grammar() -> None:
    from conftest import REPO

    from extractor.engine import schema_to_grammar
    from extractor.taskfiles import load_taskfiles

    for tf in load_taskfiles(REPO / "taskfiles").values():
        for reasoning in (True, False):
            grammar = schema_to_grammar(answer_schema(tf, reasoning=reasoning))
            assert "root ::=" in grammar
