"""The answer a Taskfile asks for: its JSON schema (for the grammar) and its validation.

The schema is written out by hand, flat and without `$ref`/`anyOf`, because the llama.cpp
schema-to-grammar converter handles exactly that shape reliably. The same Taskfile also yields
a pydantic model that validates what comes back.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from extractor.taskfiles import NerSpec, OutputField, Taskfile

REASONING_FIELD = "reasoning"
MAX_WORD_INDEX = 99999


class AnswerError(ValueError):
    """Model output that is not a valid answer (bad JSON, wrong fields, out-of-range values)."""


def _entity_schema(ner: NerSpec) -> dict[str, Any]:
    props: dict[str, Any] = {
        "start": {"type": "integer", "minimum": 0, "maximum": MAX_WORD_INDEX},
        "text": {"type": "string", "minLength": 1, "maxLength": ner.max_text_chars},
        "end": {"type": "integer", "minimum": 0, "maximum": MAX_WORD_INDEX},
        "type": {"enum": list(ner.entity_types)},
    }
    if ner.numbered:
        props["item"] = {"type": "integer", "minimum": ner.item_min, "maximum": ner.item_max}
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


def _field_schema(field: OutputField, tf: Taskfile) -> dict[str, Any]:
    if field.type == "boolean":
        return {"type": "boolean"}
    if field.type == "label":
        return {"enum": list(field.labels or ())}
    if field.type == "number":
        return {"type": ["number", "null"]} if field.nullable else {"type": "number"}
    assert tf.ner is not None
    return {
        "type": "array",
        "items": _entity_schema(tf.ner),
        "maxItems": tf.ner.max_entities,
    }


def answer_schema(tf: Taskfile, *, reasoning: bool) -> dict[str, Any]:
    """The JSON schema of one answer: optional bounded reasoning first, then the fields in order."""
    props: dict[str, Any] = {}
    if reasoning:
        props[REASONING_FIELD] = {"type": "string", "maxLength": tf.reasoning.max_chars}
    for field in tf.fields:
        props[field.name] = _field_schema(field, tf)
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


def score_choices(tf: Taskfile) -> dict[str, tuple[str, ...]]:
    """Per field, the JSON literals whose likelihood the backend should report.

    Binary fields score `true`/`false` (a probability for AUROC), label fields every label (the
    prediction is the most likely training label). Numbers and entities are generated.
    """
    choices: dict[str, tuple[str, ...]] = {}
    for field in tf.fields:
        if field.type == "boolean":
            choices[field.name] = ("true", "false")
        elif field.type == "label":
            choices[field.name] = tuple(orjson.dumps(lab).decode() for lab in field.labels or ())
    return choices


class _Entity(BaseModel):
    """One entity: first and last word number (inclusive), its words as written, its type."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    start: int | None = Field(default=None, ge=0)
    text: str
    end: int | None = Field(default=None, ge=0)
    type: str
    item: int | None = None


_MODELS: dict[str, type[BaseModel]] = {}


def _answer_model(tf: Taskfile) -> type[BaseModel]:
    key = tf.digest()
    if key not in _MODELS:
        _MODELS[key] = _build_answer_model(tf)
    return _MODELS[key]


def _build_answer_model(tf: Taskfile) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for field in tf.fields:
        if field.type == "boolean":
            fields[field.name] = (bool, ...)
        elif field.type == "label":
            fields[field.name] = (Literal[tuple(field.labels or ())], ...)  # type: ignore[misc]
        elif field.type == "number":
            fields[field.name] = ((float | None) if field.nullable else float, ...)
        else:
            ner = tf.ner
            assert ner is not None
            entity = create_model(
                "Entity",
                __base__=_Entity,
                type=(Literal[tuple(ner.entity_types)], ...),  # type: ignore[misc]
                text=(str, Field(min_length=1, max_length=ner.max_text_chars)),
                item=(int, Field(ge=ner.item_min, le=ner.item_max)) if ner.numbered else (None, None),
            )
            fields[field.name] = (list[entity], Field(max_length=ner.max_entities))  # type: ignore[valid-type]
    fields[REASONING_FIELD] = (str | None, None)
    return create_model("Answer", __config__=ConfigDict(extra="forbid"), **fields)


def parse_answer(text: str, tf: Taskfile) -> dict[str, Any]:
    """Parse and validate raw model output; the answer fields only (reasoning dropped)."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise AnswerError(f"not valid JSON: {err}") from None
    return validate_answer(data, tf)


def validate_answer(data: Any, tf: Taskfile) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise AnswerError(f"expected a JSON object, got {type(data).__name__}")
    try:
        model = _answer_model(tf).model_validate(data)
    except ValidationError as err:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        raise AnswerError(msg) from None
    dumped = model.model_dump()
    dumped.pop(REASONING_FIELD, None)
    return dumped
