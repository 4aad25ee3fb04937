"""Taskfiles: what to ask the model for one task, as validated data.

A Taskfile is a JSON file in `taskfiles/`. It names the tasks it serves, the instructions, the
output fields (in label order: field i answers position i of a multi-label target), how the
input is rendered, whether a bounded `reasoning` field comes first and the output token budget.
Jobs without a Taskfile get one derived from `label_name` and the training labels, and the
training labels always override the Taskfile's label inventory.
"""

from __future__ import annotations

import hashlib
import logging
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from extractor.dragon_io import Case, TaskConfig
from extractor.tasktypes import TaskType, ValueKind, task_type

log = logging.getLogger(__name__)

FIELD_TYPE_FOR_KIND = {
    ValueKind.BINARY: "boolean",
    ValueKind.CLASS: "label",
    ValueKind.NUMBER: "number",
    ValueKind.TAGS: "entities",
}
NUMBERED_TAG = re.compile(r"^(\d+)-(.+)$")


class TaskfileError(Exception):
    """A Taskfile that does not validate or does not fit the job."""


class OutputField(BaseModel):
    """One answer field; its position in `fields` is its position in the DRAGON label list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: Literal["boolean", "label", "number", "entities"]
    description: str = ""
    labels: tuple[str, ...] | None = None
    # What a label means, keyed by label: rendered for the job's (training) labels only, so a
    # description of a label the job does not have never reaches the prompt.
    label_descriptions: dict[str, str] = {}
    # "most_likely": the label with the highest likelihood. "min_expected_cost": the label with the
    # lowest expected linear cost |rank - true rank| under the label likelihoods (ordinal labels
    # scored by linearly weighted kappa); ranks follow dragon-eval's order (see `ordinal_ranks`).
    decision: Literal["most_likely", "min_expected_cost"] = "most_likely"
    nullable: bool = False
    # The value written when a number field has no answer; "median" is the training median of
    # this position, resolved when the Taskfile is fitted to the job (`fit_to_training`).
    missing_value: float | Literal["median"] = 0.0

    @model_validator(mode="after")
    def _labels_for_label_fields(self) -> OutputField:
        if self.type == "label" and not self.labels:
            raise ValueError(f"field {self.name!r}: a 'label' field needs a non-empty 'labels' list")
        if self.type != "label" and (self.labels or self.label_descriptions or self.decision != "most_likely"):
            raise ValueError(f"field {self.name!r}: only 'label' fields take labels, label_descriptions, decision")
        if self.type != "number" and self.missing_value == "median":
            raise ValueError(f"field {self.name!r}: missing_value 'median' is for 'number' fields")
        return self


class InputFormat(BaseModel):
    """How a case's text is shown to the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["text", "sentence_pair", "block_report", "words"] = "text"
    part_names: tuple[str, ...] = ()


class Reasoning(BaseModel):
    """A bounded free-text `reasoning` field written before the answer (chain of thought)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    max_chars: int = Field(default=400, ge=20, le=4000)
    # Where the yes/no likelihoods (the AUROC probabilities) come from when reasoning
    # is on: after the reasoning (near 0/1: AUROC sees ties), or from the same prompt asked again
    # without it (a ranking; one more short generation per report).
    scores: Literal["after_reasoning", "without_reasoning"] = "after_reasoning"


class Examples(BaseModel):
    """Solved training reports shown before the report: retrieved per report (BM25), a fixed
    label-balanced set (the same for every report, so it stays in the shared prompt prefix), or none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["none", "retrieved", "fixed"] = "retrieved"
    k: int = Field(default=4, ge=0, le=32)
    max_chars: int = Field(default=1200, ge=50, le=20000)
    # Which part of a long example is kept. "side": cut on the job's truncation side (the report's
    # start survives a right truncation). "answer": the window of `max_chars` holding the most
    # places the answer comes from (an entity; a number's written value; else an `anchors` word),
    # so an example never shows a report whose answer was cut away.
    window: Literal["side", "answer"] = "side"
    anchors: tuple[str, ...] = ()


class NerSpec(BaseModel):
    """Entity extraction: the allowed types and how positions are given and resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entity_types: tuple[str, ...]
    type_descriptions: dict[str, str] = {}
    # Other spellings of a described type, as the data may write it: {"<RAPPORT-ID>": "<RAPPORT_ID>"}
    # lets a training tag `<RAPPORT-ID>` take the description of `<RAPPORT_ID>`.
    type_aliases: dict[str, str] = {}
    numbered: bool = False  # tags read B-{item}-{type} (multi-label NER)
    item_min: int = 0
    item_max: int = 9
    # Where an entity goes when its own position is unusable: every occurrence of its text, or
    # the first one not already taken by the same type; `unplaced_after` (marker words such as
    # "CONCLUSIE", case-insensitive) makes occurrences after the first marker word win.
    unplaced: Literal["all", "first"] = "all"
    unplaced_after: tuple[str, ...] = ()
    max_entities: int = Field(default=48, ge=1, le=512)
    max_text_chars: int = Field(default=120, ge=1, le=2000)

    @model_validator(mode="after")
    def _aliases_name_described_types(self) -> NerSpec:
        for alias, target in self.type_aliases.items():
            if target not in self.type_descriptions:
                raise ValueError(f"type_aliases: {alias!r} points to {target!r}, which has no type_descriptions entry")
            if alias in self.type_descriptions:
                raise ValueError(f"type_aliases: {alias!r} has its own type_descriptions entry")
        return self

    def canonical(self, tag: str) -> str:
        """The described type a tag spelling stands for (itself when it is no alias)."""
        return self.type_aliases.get(tag, tag)

    def description_for(self, tag: str) -> str | None:
        return self.type_descriptions.get(self.canonical(tag))

    def described_types(self) -> list[tuple[tuple[str, ...], str | None]]:
        """The job's entity types grouped by the description they share (spellings of one type
        together), in `entity_types` order; None where a type has no description."""
        groups: dict[str, list[str]] = {}
        for tag in self.entity_types:
            groups.setdefault(self.canonical(tag), []).append(tag)
        return [(tuple(tags), self.type_descriptions.get(key)) for key, tags in groups.items()]


MAX_OUTPUT_TOKENS = 8192  # the most one answer may get (a Taskfile, or reasoning switched on by flag)


class Taskfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task_names: tuple[str, ...]
    label_name: str
    instructions: str
    input: InputFormat = InputFormat()
    fields: tuple[OutputField, ...]
    ner: NerSpec | None = None
    reasoning: Reasoning = Reasoning()
    examples: Examples = Examples()
    max_output_tokens: int = Field(default=256, ge=8, le=MAX_OUTPUT_TOKENS)
    notes: str = ""
    source: str = Field(default="", exclude=True)  # where it was loaded from, for messages

    @model_validator(mode="after")
    def _fits_label_name(self) -> Taskfile:
        ttype = task_type(self.label_name)
        want = FIELD_TYPE_FOR_KIND[ttype.kind]
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names) or "reasoning" in names:
            raise ValueError(f"field names must be unique and not 'reasoning': {names}")
        if any(f.type != want for f in self.fields):
            raise ValueError(f"{self.label_name} needs fields of type {want!r}")
        if (ttype.is_ner or not ttype.multi) and len(self.fields) != 1:
            raise ValueError(f"{self.label_name} needs exactly one field, got {len(self.fields)}")
        if ttype.is_ner != (self.ner is not None):
            raise ValueError("an 'ner' section is required for NER tasks and only for them")
        if (self.input.kind == "words") != ttype.is_ner:
            raise ValueError("input kind 'words' is required for NER tasks and only for them")
        if self.ner is not None and self.ner.numbered != ttype.multi:
            raise ValueError("'ner.numbered' must be true exactly for multi-label NER")
        return self

    @property
    def task_type(self) -> TaskType:
        return task_type(self.label_name)

    def digest(self) -> str:
        """A hash of everything that changes the prompt or the answers."""
        return hashlib.sha256(orjson.dumps(self.model_dump(), option=orjson.OPT_SORT_KEYS)).hexdigest()


def load_taskfile(path: Path) -> Taskfile:
    try:
        data = orjson.loads(Path(path).read_bytes())
    except orjson.JSONDecodeError as err:
        raise TaskfileError(f"{path}: malformed JSON: {err}") from None
    try:
        return Taskfile.model_validate({**data, "source": str(path)})
    except ValidationError as err:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in err.errors())
        raise TaskfileError(f"{path}: {details}") from None


def load_taskfiles(directory: Path) -> dict[str, Taskfile]:
    """All Taskfiles of a folder, keyed by task name; a task claimed twice is an error."""
    by_task: dict[str, Taskfile] = {}
    for path in sorted(Path(directory).glob("*.json")):
        tf = load_taskfile(path)
        for name in tf.task_names:
            if name in by_task:
                raise TaskfileError(f"{path}: task {name!r} is already served by {by_task[name].source}")
            by_task[name] = tf
    return by_task


def training_label_sets(train: tuple[Case, ...], ttype: TaskType) -> list[list[str]]:
    """Per label position, the labels seen in training, most frequent first (ties by name)."""
    if ttype.kind is not ValueKind.CLASS:
        return []
    columns = [[c.label] for c in train] if not ttype.multi else [list(c.label) for c in train]
    width = max((len(col) for col in columns), default=0)
    result = []
    for i in range(width):
        counts = Counter(col[i] for col in columns if i < len(col))
        result.append(sorted(counts, key=lambda lab: (-counts[lab], lab)))
    return result


def training_tags(train: tuple[Case, ...], ttype: TaskType) -> Counter[str]:
    """Entity tag names (without B-/I-) seen in training, with their counts."""
    counts: Counter[str] = Counter()
    for case in train:
        for word_tags in case.label:
            for tag in word_tags if ttype.multi else [word_tags]:
                if tag != "O" and len(tag) > 2 and tag[1] == "-":
                    counts[tag[2:]] += 1
    return counts


def _ner_from_training(train: tuple[Case, ...], ttype: TaskType, base: NerSpec | None) -> NerSpec:
    tags = training_tags(train, ttype)
    if ttype.multi:
        items, types = [], Counter()
        for tag, n in tags.items():
            m = NUMBERED_TAG.match(tag)
            if m:
                items.append(int(m.group(1)))
                types[m.group(2)] += n
            else:
                types[tag] += n
        item_min, item_max = (min(items), max(items)) if items else (0, 9)
        entity_types = tuple(sorted(types))
        numbered = {"numbered": True, "item_min": item_min, "item_max": item_max}
    else:
        entity_types = tuple(sorted(tags))
        numbered = {"numbered": False}
    if not entity_types:
        entity_types = base.entity_types if base else ("ENTITY",)
    fields = base.model_dump() if base else {}
    fields.update(entity_types=entity_types, **numbered)
    return NerSpec.model_validate(fields)


def training_medians(train: tuple[Case, ...], ttype: TaskType) -> list[float | None]:
    """Per label position of a regression task, the median of the training values (None if none)."""
    if ttype.kind is not ValueKind.NUMBER:
        return []
    columns = [list(c.label) if ttype.multi else [c.label] for c in train]
    width = max((len(col) for col in columns), default=0)
    medians: list[float | None] = []
    for i in range(width):
        values = [float(col[i]) for col in columns if i < len(col) and col[i] is not None]
        medians.append(float(statistics.median(values)) if values else None)
    return medians


def resolve_missing_values(tf: Taskfile, train: tuple[Case, ...]) -> Taskfile:
    """Turn `missing_value: "median"` into the training median of the field's position."""
    if not any(f.missing_value == "median" for f in tf.fields):
        return tf
    medians = training_medians(train, tf.task_type)
    fields = []
    for i, field in enumerate(tf.fields):
        if field.missing_value == "median":
            median = medians[i] if i < len(medians) else None
            if median is None:
                log.warning("field %s: no training values for missing_value 'median'; using 0", field.name)
                median = 0.0
            log.info("field %s: missing_value = training median %g", field.name, median)
            field = field.model_copy(update={"missing_value": median})
        fields.append(field)
    return tf.model_copy(update={"fields": tuple(fields)})


def _log_descriptions(ner: NerSpec, source: str) -> None:
    """Say which training tags the Taskfile does not describe, and which descriptions go unused."""
    if not ner.type_descriptions:
        return
    undescribed = [t for t in ner.entity_types if ner.description_for(t) is None]
    if undescribed:
        log.warning(
            "%s: training tags %s have no description (type_descriptions or type_aliases); "
            "the prompt names them without saying what they mean",
            source,
            undescribed,
        )
    used = {ner.canonical(t) for t in ner.entity_types}
    unused = sorted(set(ner.type_descriptions) - used)
    if unused:
        log.info("%s: described types %s do not occur in training and are left out of the prompt", source, unused)


def fit_to_training(tf: Taskfile, train: tuple[Case, ...]) -> Taskfile:
    """Make the Taskfile's label inventory the training set's: the job's labels win, and the log says so.
    Training medians replace `missing_value: "median"`."""
    tf = resolve_missing_values(tf, train)
    ttype = tf.task_type
    if not train:
        return tf
    if ttype.kind is ValueKind.CLASS:
        label_sets = training_label_sets(train, ttype)
        if len(label_sets) != len(tf.fields):
            raise TaskfileError(
                f"{tf.source or 'taskfile'}: {len(tf.fields)} fields, training labels {len(label_sets)} positions"
            )
        fields = []
        for field, seen in zip(tf.fields, label_sets, strict=False):
            declared = list(field.labels or ())
            if set(declared) != set(seen):
                log.warning(
                    "field %s: training labels %s differ from the Taskfile's %s; using the training labels",
                    field.name,
                    sorted(seen),
                    sorted(declared),
                )
                ordered = [lab for lab in declared if lab in seen] + sorted(set(seen) - set(declared))
                field = field.model_copy(update={"labels": tuple(ordered)})
            undescribed = [lab for lab in field.labels or () if lab not in field.label_descriptions]
            if field.label_descriptions and undescribed:
                log.warning("field %s: training labels %s have no label description", field.name, undescribed)
            fields.append(field)
        return tf.model_copy(update={"fields": tuple(fields)})
    if ttype.multi and not ttype.is_ner:
        width = len(train[0].label)
        if width != len(tf.fields):
            raise TaskfileError(
                f"{tf.source or 'taskfile'}: {len(tf.fields)} fields but training labels have {width} positions"
            )
        return tf
    if ttype.is_ner:
        ner = _ner_from_training(train, ttype, tf.ner)
        if tf.ner and (
            set(ner.entity_types) != set(tf.ner.entity_types)
            or (ner.item_min, ner.item_max) != (tf.ner.item_min, tf.ner.item_max)
        ):
            log.warning(
                "entity types %s (items %d-%d) from training differ from the Taskfile's %s; using the training set",
                list(ner.entity_types),
                ner.item_min,
                ner.item_max,
                list(tf.ner.entity_types),
            )
        _log_descriptions(ner, tf.source or "taskfile")
        return tf.model_copy(update={"ner": ner})
    return tf


GENERIC_INSTRUCTIONS = {
    ValueKind.BINARY: "Read the report and decide, for each question, whether the answer is true or false.",
    ValueKind.CLASS: "Read the report and choose, for each question, the label that fits the report.",
    ValueKind.NUMBER: "Read the report and give the requested numbers, or null when the report does not state them.",
    ValueKind.TAGS: "Read the numbered words of the report and list every entity of the allowed types.",
}


def derive_taskfile(config: TaskConfig, train: tuple[Case, ...]) -> Taskfile:
    """A Taskfile for a task nobody wrote one for, from `label_name` and the training labels."""
    ttype = config.task_type
    kind = FIELD_TYPE_FOR_KIND[ttype.kind]
    if ttype.is_ner:
        width = 1
    elif ttype.multi:
        width = len(train[0].label) if train else 1
    else:
        width = 1
    label_sets = training_label_sets(train, ttype)
    fields = []
    for i in range(width):
        name = "entities" if ttype.is_ner else ("answer" if width == 1 else f"answer_{i + 1}")
        labels = tuple(label_sets[i]) if ttype.kind is ValueKind.CLASS and i < len(label_sets) else None
        if ttype.kind is ValueKind.CLASS and not labels:
            labels = ("unknown",)
        fields.append(
            OutputField(
                name=name,
                type=kind,
                labels=labels,
                nullable=ttype.kind is ValueKind.NUMBER,
            )
        )
    if ttype.is_ner:
        input_format = InputFormat(kind="words")
    elif config.input_name == "text_parts":
        input_format = InputFormat(kind="sentence_pair", part_names=("Part 1", "Part 2"))
    else:
        input_format = InputFormat(kind="text")
    tf = Taskfile(
        task_names=(config.task_name,),
        label_name=config.label_name,
        instructions=GENERIC_INSTRUCTIONS[ttype.kind],
        input=input_format,
        fields=tuple(fields),
        ner=_ner_from_training(train, ttype, None) if ttype.is_ner else None,
        reasoning=Reasoning(enabled=not ttype.is_ner, max_chars=300),
        max_output_tokens=1024 if ttype.is_ner else 256,
        notes="Derived at run time from label_name and the training labels; no task knowledge.",
        source=f"derived for {config.task_name}",
    )
    return tf


def taskfile_for_job(config: TaskConfig, train: tuple[Case, ...], taskfiles: dict[str, Taskfile]) -> Taskfile:
    """Select the Taskfile by task name (or derive one), then fit it to the training labels."""
    tf = taskfiles.get(config.task_name)
    if tf is None:
        log.info(
            "no Taskfile serves %s; deriving one from the training labels",
            config.task_name,
        )
        return derive_taskfile(config, train)
    if tf.label_name != config.label_name:
        raise TaskfileError(f"{tf.source}: label_name {tf.label_name!r} but the job has {config.label_name!r}")
    if tf.input.kind in ("sentence_pair", "block_report", "words") and config.input_name != "text_parts":
        raise TaskfileError(
            f"{tf.source}: input kind {tf.input.kind!r} needs text_parts, the job has {config.input_name!r}"
        )
    log.info("Taskfile %s serves %s", tf.source, config.task_name)
    return fit_to_training(tf, train)
