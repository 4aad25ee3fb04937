from __future__ import annotations

import random

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
    assert parse_answer(text, answer_schema(make_tf(), reasoning=True)) == {"side": "left", "grade": "n"}


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
        parse_answer(text, answer_schema(make_tf(), reasoning=True))


def test_entity_item_must_be_in_range() -> None:
    tf = make_tf(**NER)
    good = {"entities": [{"start": 0, "text": "a", "end": 0, "type": "lesion", "item": 2}]}
    assert parse_answer(orjson.dumps(good).decode(), answer_schema(tf, reasoning=False))["entities"][0]["item"] == 2
    bad = {"entities": [{"start": 0, "text": "a", "end": 0, "type": "lesion", "item": 7}]}
    with pytest.raises(AnswerError, match="item"):
        parse_answer(orjson.dumps(bad).decode(), answer_schema(tf, reasoning=False))


def test_every_shipped_taskfile_schema_converts_to_a_grammar() -> None:
    from conftest import REPO

    from extractor.engine import schema_to_grammar
    from extractor.taskfiles import load_taskfiles

    for tf in load_taskfiles(REPO / "taskfiles").values():
        for reasoning in (True, False):
            grammar = schema_to_grammar(answer_schema(tf, reasoning=reasoning))
            assert "root ::=" in grammar


def _sample(schema: dict, rng: random.Random):
    """A random instance of the subset of JSON schema that answer_schema writes."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema["type"]
    if isinstance(kind, list):
        kind = rng.choice(kind)
    if kind == "null":
        return None
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "number":
        return rng.choice([0, -3, 2.5, 1e-3, 120])
    if kind == "integer":
        return rng.randint(schema.get("minimum", -5), min(schema.get("maximum", 50), 50))
    if kind == "string":
        size = rng.randint(schema.get("minLength", 0), min(schema.get("maxLength", 20), 20))
        return "".join(rng.choice('ab "\\é\n') for _ in range(size))
    if kind == "array":
        return [_sample(schema["items"], rng) for _ in range(rng.randint(0, min(schema.get("maxItems", 3), 3)))]
    return {name: _sample(sub, rng) for name, sub in schema["properties"].items()}


def test_every_schema_valid_answer_validates_for_every_shipped_taskfile() -> None:
    from conftest import REPO

    from extractor.taskfiles import load_taskfiles

    rng = random.Random(0)
    for tf in load_taskfiles(REPO / "taskfiles").values():
        for reasoning in (True, False):
            schema = answer_schema(tf, reasoning=reasoning)
            for _ in range(20):
                text = orjson.dumps(_sample(schema, rng)).decode()
                answer = parse_answer(text, schema)
                assert set(answer) == {f.name for f in tf.fields}, tf.source


def test_validation_requires_what_the_grammar_requires() -> None:
    """Entity positions are required by the grammar, so validation requires them too."""
    schema = answer_schema(make_tf(**NER), reasoning=False)
    no_start = {"entities": [{"text": "a", "end": 0, "type": "lesion", "item": 2}]}
    with pytest.raises(AnswerError, match="start"):
        parse_answer(orjson.dumps(no_start).decode(), schema)
    with_reasoning = answer_schema(make_tf(), reasoning=True)
    with pytest.raises(AnswerError, match="reasoning"):
        parse_answer('{"side": "left", "grade": "0"}', with_reasoning)
    with pytest.raises(AnswerError, match="grade"):
        parse_answer('{"reasoning": "", "side": "left", "grade": 1}', with_reasoning)
