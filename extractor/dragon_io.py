"""DRAGON job I/O: read and validate the four input files, verify and write predictions.

Knows the DRAGON file names and record shapes; knows nothing of models or prompts.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from extractor.tasktypes import TaskType, ValueKind, task_type

CONFIG_FILE = "nlp-task-configuration.json"
TRAIN_FILE = "nlp-training-dataset.json"
VALIDATION_FILE = "nlp-validation-dataset.json"
TEST_FILE = "nlp-test-dataset.json"
PREDICTIONS_FILE = "nlp-predictions-dataset.json"


class JobError(Exception):
    """A DRAGON input that cannot be used; the message names the file, record and field."""


class PredictionError(Exception):
    """Predictions that the DRAGON evaluator would reject."""


class TaskConfig(BaseModel):
    """`nlp-task-configuration.json`; unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    jobid: int = 0
    task_name: str
    input_name: Literal["text", "text_parts"]
    label_name: str
    recommended_truncation_side: Literal["left", "right"] = "left"
    version: str = "1.0"

    @field_validator("label_name")
    @classmethod
    def _known_label(cls, value: str) -> str:
        task_type(value)
        return value

    @property
    def task_type(self) -> TaskType:
        return task_type(self.label_name)


@dataclass(frozen=True)
class Case:
    """One report: `text` for plain reports, `parts` for `text_parts` inputs."""

    uid: str
    text: str | None = None
    parts: tuple[str, ...] | None = None
    label: Any = None

    @property
    def content(self) -> str:
        """All of the case's text, for emptiness checks and similarity."""
        return self.text if self.text is not None else " ".join(self.parts or ())

    @property
    def is_blank(self) -> bool:
        return not self.content.strip()


@dataclass(frozen=True)
class Job:
    """A validated DRAGON job: configuration plus the three case lists."""

    config: TaskConfig
    train: tuple[Case, ...]
    validation: tuple[Case, ...]
    test: tuple[Case, ...]
    input_dir: Path

    @property
    def task_type(self) -> TaskType:
        return self.config.task_type

    @property
    def label_length(self) -> int | None:
        """The fixed list length of multi-label classification/regression labels."""
        if not self.task_type.multi or self.task_type.is_ner or not self.train:
            return None
        return len(self.train[0].label)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise JobError(f"{path}: missing input file")
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as err:
        raise JobError(f"{path}: malformed JSON: {err}") from None


def load_config(input_dir: Path) -> TaskConfig:
    path = input_dir / CONFIG_FILE
    data = _read_json(path)
    if not isinstance(data, dict):
        raise JobError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return TaskConfig.model_validate(data)
    except ValidationError as err:
        raise JobError(f"{path}: {_describe(err)}") from None


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(record)"
        parts.append(f"field {where!r}: {e['msg']}")
    return "; ".join(parts)


def _check_label(value: Any, ttype: TaskType, n_parts: int | None) -> str | None:
    """Return what is wrong with one label value, or None when it fits the task type."""
    kind, multi = ttype.kind, ttype.multi

    def scalar_ok(v: Any) -> bool:
        if kind is ValueKind.BINARY:
            return isinstance(v, bool)
        if kind is ValueKind.CLASS:
            return isinstance(v, str)
        if kind is ValueKind.NUMBER:
            ok_number = isinstance(v, (int, float)) and not isinstance(v, bool)
            return ok_number and math.isfinite(v)
        return False

    if kind is ValueKind.TAGS:
        if not isinstance(value, list):
            return "expected a list of tags, one per word"
        if n_parts is not None and len(value) != n_parts:
            return f"expected {n_parts} tags (one per word), got {len(value)}"
        if multi:
            bad = any(not isinstance(t, list) or not all(isinstance(s, str) for s in t) for t in value)
            return "expected a list (per word) of lists of tag strings" if bad else None
        bad = any(not isinstance(t, str) for t in value)
        return "expected a list of tag strings" if bad else None
    if multi:
        if not isinstance(value, list):
            return "expected a list"
        for v in value:
            if v is None and kind is ValueKind.NUMBER:
                continue
            if not scalar_ok(v):
                return f"unexpected list element {v!r} for {ttype.label_name}"
        return None
    return None if scalar_ok(value) else f"unexpected value {value!r} for {ttype.label_name}"


def load_cases(path: Path, config: TaskConfig, *, labelled: bool) -> tuple[Case, ...]:
    """Read one dataset file; every problem names the file, the record and the field."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise JobError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    ttype = config.task_type
    cases: list[Case] = []
    seen: set[str] = set()
    for i, record in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(record, dict):
            raise JobError(f"{where}: expected an object, got {type(record).__name__}")
        uid = record.get("uid")
        if isinstance(uid, bool) or not isinstance(uid, (str, int)):
            raise JobError(f"{where}: field 'uid': expected a string, got {uid!r}")
        uid = str(uid)
        where = f"{path}: record {i} (uid {uid})"
        if uid in seen:
            raise JobError(f"{where}: field 'uid': duplicate uid")
        seen.add(uid)
        raw = record.get(config.input_name)
        text: str | None = None
        parts: tuple[str, ...] | None = None
        if config.input_name == "text":
            if raw is None:
                raw = ""
            if not isinstance(raw, str):
                raise JobError(f"{where}: field 'text': expected a string, got {type(raw).__name__}")
            text = raw
        else:
            if raw is None:
                raw = []
            if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
                raise JobError(f"{where}: field 'text_parts': expected a list of strings")
            parts = tuple(raw)
        label = None
        if labelled:
            if config.label_name not in record:
                raise JobError(f"{where}: field {config.label_name!r}: missing")
            label = record[config.label_name]
            n_parts = len(parts) if parts is not None else None
            problem = _check_label(label, ttype, n_parts)
            if problem:
                raise JobError(f"{where}: field {config.label_name!r}: {problem}")
        cases.append(Case(uid=uid, text=text, parts=parts, label=label))
    if labelled and ttype.multi and not ttype.is_ner and cases:
        lengths = {len(c.label) for c in cases}
        if len(lengths) > 1:
            raise JobError(f"{path}: field {config.label_name!r}: label lists differ in length {sorted(lengths)}")
    return tuple(cases)


def load_job(input_dir: Path) -> Job:
    """Read and validate a DRAGON job folder. The validation file is optional."""
    input_dir = Path(input_dir)
    config = load_config(input_dir)
    train = load_cases(input_dir / TRAIN_FILE, config, labelled=True)
    val_path = input_dir / VALIDATION_FILE
    validation = load_cases(val_path, config, labelled=True) if val_path.is_file() else ()
    test = load_cases(input_dir / TEST_FILE, config, labelled=False)
    return Job(
        config=config,
        train=train,
        validation=validation,
        test=test,
        input_dir=input_dir,
    )


def verify_predictions(records: list[dict[str, Any]], job: Job) -> None:
    """Check predictions the way the DRAGON baseline does before they are written.

    Every test uid exactly once, two keys per record, the right value type, list lengths equal to
    the training label lengths, NER lengths equal to the number of words, binary scores in [0, 1].
    """
    ttype = job.task_type
    key = ttype.prediction_key
    expected = {c.uid: c for c in job.test}
    problems: list[str] = []
    seen: set[str] = set()
    for i, rec in enumerate(records):
        uid = rec.get("uid")
        if set(rec) != {"uid", key}:
            problems.append(f"record {i}: keys {sorted(rec)} != ['uid', {key!r}]")
            continue
        if uid not in expected:
            problems.append(f"record {i}: uid {uid!r} is not a test uid")
            continue
        if uid in seen:
            problems.append(f"record {i}: uid {uid!r} predicted twice")
            continue
        seen.add(uid)
        problem = _check_prediction(rec[key], ttype, expected[uid], job.label_length)
        if problem:
            problems.append(f"uid {uid}: {problem}")
    missing = [uid for uid in expected if uid not in seen]
    if missing:
        problems.append(f"{len(missing)} test uids without prediction, e.g. {missing[:3]}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise PredictionError(f"predictions failed verification:\n  {shown}{more}")


def _check_prediction(value: Any, ttype: TaskType, case: Case, label_length: int | None) -> str | None:
    kind = ttype.kind

    def number_ok(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if kind is ValueKind.TAGS:
        n = len(case.parts or ())
        if not isinstance(value, list) or len(value) != n:
            return f"expected {n} tags (one per word)"
        if ttype.multi:
            if not all(isinstance(t, list) and t and all(isinstance(s, str) for s in t) for t in value):
                return "expected a non-empty list of tag strings per word"
        elif not all(isinstance(t, str) for t in value):
            return "expected one tag string per word"
        return None
    values = value if ttype.multi else [value]
    if ttype.multi:
        if not isinstance(value, list) or len(value) != label_length:
            return f"expected a list of {label_length} values"
    for v in values:
        if kind is ValueKind.BINARY and not (isinstance(v, float) and 0.0 <= v <= 1.0):
            return f"expected a float probability in [0, 1], got {v!r}"
        if kind is ValueKind.CLASS and not isinstance(v, str):
            return f"expected a label string, got {v!r}"
        if kind is ValueKind.NUMBER and not number_ok(v):
            return f"expected a finite number, got {v!r}"
    return None


def write_predictions(records: list[dict[str, Any]], output_dir: Path) -> Path:
    """Write the predictions file complete or not at all (temp file in place, then rename)."""
    target = Path(output_dir) / PREDICTIONS_FILE
    atomic_write(target, orjson.dumps(records, option=orjson.OPT_INDENT_2))
    return target


def atomic_write(target: Path, data: bytes) -> None:
    """Write a file complete or not at all: a temp file beside it, fsync, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
