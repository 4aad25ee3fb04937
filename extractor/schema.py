"""The answer a Taskfile asks for: its JSON schema (for the grammar) and its validation.

The JSON schema is the one definition: written flat and without `$ref`/`anyOf`, because the
llama.cpp schema-to-grammar converter handles exactly that shape reliably, and the pydantic model
that validates what comes back is derived from that same schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
)

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


_MODELS: dict[bytes, type[BaseModel]] = {}


def answer_model(schema: Mapping[str, Any]) -> type[BaseModel]:
    """The pydantic model that validates answers to `schema`, derived from the schema itself, so
    what the grammar allows and what validation accepts cannot drift apart."""
    key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    if key not in _MODELS:
        _MODELS[key] = _object_model("Answer", schema)
    return _MODELS[key]


def _object_model(name: str, schema: Mapping[str, Any]) -> type[BaseModel]:
    required = set(schema.get("required", ()))
    fields: dict[str, Any] = {}
    for prop, sub in schema["properties"].items():
        kind = _python_type(f"{name}_{prop}", sub)
        fields[prop] = (kind, ...) if prop in required else (kind | None, None)
    extra = "forbid" if schema.get("additionalProperties") is False else "ignore"
    return create_model(name, __config__=ConfigDict(extra=extra, strict=False), **fields)


def _python_type(name: str, sub: Mapping[str, Any]) -> Any:
    """The subset of JSON schema that answer_schema writes, as annotated Python types."""
    if "enum" in sub:
        return Literal[tuple(sub["enum"])]  # type: ignore[misc]
    kind = sub["type"]
    if isinstance(kind, list):  # ["number", "null"]
        inner = [_python_type(name, {**sub, "type": k}) for k in kind if k != "null"]
        return (inner[0] | None) if "null" in kind else inner[0]
    if kind == "boolean":
        return StrictBool
    if kind == "number":
        return StrictFloat  # an integer is a number; a boolean or a string is not
    if kind == "integer":
        return Annotated[StrictInt, Field(ge=sub.get("minimum"), le=sub.get("maximum"))]
    if kind == "string":
        return Annotated[StrictStr, Field(min_length=sub.get("minLength"), max_length=sub.get("maxLength"))]
    if kind == "array":
        item = _python_type(name, sub["items"])
        return Annotated[list[item], Field(max_length=sub.get("maxItems"))]  # type: ignore[valid-type]
    if kind == "object":
        return _object_model(name, sub)
    raise ValueError(f"answer schema: unsupported type {kind!r}")


def parse_answer(text: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    """Parse and validate raw model output against the request's schema; the answer fields only
    (reasoning dropped)."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise AnswerError(f"not valid JSON: {err}") from None
    return validate_answer(data, schema)


def validate_answer(data: Any, schema: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise AnswerError(f"expected a JSON object, got {type(data).__name__}")
    try:
        model = answer_model(schema).model_validate(data)
    except ValidationError as err:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        raise AnswerError(msg) from None
    dumped = model.model_dump()
    dumped.pop(REASONING_FIELD, None)
    return dumped
