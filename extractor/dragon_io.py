"""DRAGON job I/O: read and validate the four input files, verify and write predictions.

Knows the DRAGON file names and record shapes; knows nothing of models or prompts.

What a defect costs follows the README's reliability table: a record that breaks the format costs
that record (a training or validation record is dropped, a test record is answered with the
fallback), a configuration hint outside the specification gets its default, and only what leaves
the task undefined fails the job with a `JobError`. Every warning names the file, the record
(index and uid) and the field.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from extractor.tasktypes import TaskType, ValueKind, task_type

log = logging.getLogger(__name__)

CONFIG_FILE = "nlp-task-configuration.json"
TRAIN_FILE = "nlp-training-dataset.json"
VALIDATION_FILE = "nlp-validation-dataset.json"
TEST_FILE = "nlp-test-dataset.json"
PREDICTIONS_FILE = "nlp-predictions-dataset.json"

# Configuration fields that are hints: a value outside the specification gets this default.
CONFIG_HINT_DEFAULTS: dict[str, Any] = {"recommended_truncation_side": "left", "jobid": 0, "version": "1.0"}
# Per file, the first this many defective records get a warning each; the rest are counted.
MAX_RECORD_WARNINGS = 20


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
    """A validated DRAGON job: configuration plus the three case lists.

    `dropped` counts the records left out per list ("train", "validation", "test"; a test record
    is only dropped when it has no usable uid to answer under); `unreadable` holds the uids of
    test records whose input could not be read, kept as blank cases that get the fallback."""

    config: TaskConfig
    train: tuple[Case, ...]
    validation: tuple[Case, ...]
    test: tuple[Case, ...]
    input_dir: Path
    dropped: Mapping[str, int] = field(default_factory=dict)
    unreadable: tuple[str, ...] = ()

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
    """Strict JSON; failing that, what Python's own reader accepts (NaN, Infinity, invalid UTF-8,
    lone surrogates), with invalid characters replaced and a warning. Neither: a JobError."""
    if not path.is_file():
        raise JobError(f"{path}: missing input file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise JobError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        strict_error = err
    try:
        data = json.loads(raw.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        raise JobError(f"{path}: malformed JSON: {strict_error}") from None
    log.warning("%s: not strict JSON (%s); read leniently, invalid characters replaced", path, strict_error)
    return _clean_strings(data)


def _clean_strings(value: Any) -> Any:
    """Replace lone surrogates (valid for Python's JSON reader, not UTF-8) so every string encodes."""
    if isinstance(value, str):
        return value.encode("utf-8", errors="replace").decode("utf-8")
    if isinstance(value, list):
        return [_clean_strings(v) for v in value]
    if isinstance(value, dict):
        return {_clean_strings(k): _clean_strings(v) for k, v in value.items()}
    return value


def load_config(input_dir: Path) -> TaskConfig:
    """The task configuration; a hint outside the specification gets its default with a warning."""
    path = input_dir / CONFIG_FILE
    data = _read_json(path)
    if not isinstance(data, dict):
        raise JobError(f"{path}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    while True:
        try:
            return TaskConfig.model_validate(data)
        except ValidationError as err:
            errors = err.errors()
            hints = {str(e["loc"][0]) for e in errors if e["loc"] and e["loc"][0] in CONFIG_HINT_DEFAULTS}
            fatal = [e for e in errors if not (e["loc"] and e["loc"][0] in CONFIG_HINT_DEFAULTS)]
            if fatal or not hints:
                raise JobError(f"{path}: {_describe(fatal or errors)}") from None
            for name in sorted(hints):
                log.warning(
                    "%s: field %r: %r is outside the specification; using the default %r",
                    path,
                    name,
                    data.pop(name),
                    CONFIG_HINT_DEFAULTS[name],
                )


def _describe(errors: list[Any]) -> str:
    parts = []
    for e in errors:
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
            bad = any(not isinstance(t, list) or not t or not all(isinstance(s, str) for s in t) for t in value)
            return "expected a list (per word) of non-empty lists of tag strings" if bad else None
        bad = any(not isinstance(t, str) for t in value)
        return "expected a list of tag strings" if bad else None
    if multi:
        if not isinstance(value, list) or not value:
            return "expected a non-empty list"
        for v in value:
            if v is None and kind is ValueKind.NUMBER:
                continue  # an absent value of a multi-label regression target
            if not scalar_ok(v):
                return f"unexpected list element {v!r} for {ttype.label_name}"
        return None
    return None if scalar_ok(value) else f"unexpected value {value!r} for {ttype.label_name}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _Defects:
    """The warnings of one file: each defective record once, the first few in full."""

    path: Path
    consequence: str
    count: int = 0

    def add(self, where: str, field_name: str, problem: str, consequence: str | None = None) -> None:
        self.count += 1
        if self.count <= MAX_RECORD_WARNINGS:
            log.warning("%s: field %r: %s; %s", where, field_name, problem, consequence or self.consequence)

    def close(self) -> None:
        if self.count > MAX_RECORD_WARNINGS:
            log.warning(
                "%s: %d defective records in all (%d more not shown); %s",
                self.path,
                self.count,
                self.count - MAX_RECORD_WARNINGS,
                self.consequence,
            )


def _read_input(record: dict[str, Any], config: TaskConfig) -> tuple[str | None, tuple[str, ...] | None, str | None]:
    """The record's text or text parts, and what is wrong with them (None when nothing is)."""
    name = config.input_name
    if name not in record:
        return None, None, "missing"
    raw = record[name]
    if name == "text":
        if not isinstance(raw, str):
            return None, None, f"expected a string, got {_short(raw)}"
        return raw, None, None
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        return None, None, f"expected a list of strings, got {_short(raw)}"
    return None, tuple(raw), None


def _unreadable_input(record: dict[str, Any], config: TaskConfig) -> tuple[str | None, tuple[str, ...] | None]:
    """A blank stand-in for a test record's unreadable input, so the fallback answers it; a list of
    text parts keeps its length (an NER prediction needs one tag per word)."""
    if config.input_name == "text":
        return "", None
    raw = record.get(config.input_name)
    return None, tuple("" for _ in raw) if isinstance(raw, list) else ()


@dataclass(frozen=True)
class CaseFile:
    """One dataset file as read: its usable cases, how many records were dropped, and the uids
    of test records answered with the fallback."""

    cases: tuple[Case, ...]
    dropped: int = 0
    unreadable: tuple[str, ...] = ()


def _read_array(path: Path) -> list[Any]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise JobError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def read_cases(
    path: Path, config: TaskConfig, *, role: str, label_length: int | None = None, data: list[Any] | None = None
) -> CaseFile:
    """Read one dataset file (`role` "train", "validation" or "test"; `data`: its records when
    already read) as the reliability table says.

    A defective training or validation record is dropped; a test record with an unreadable input
    becomes a blank case (the fallback answers it), one without a usable uid is dropped. Duplicate
    uids fail the job. Multi-label lists take the most common length in training (`label_length`,
    when given, for validation); records of another length are dropped."""
    labelled = role != "test"
    data = _read_array(path) if data is None else data
    ttype = config.task_type
    defects = _Defects(path, "record dropped" if labelled else "answered with the fallback")
    dropped = 0
    unreadable: list[str] = []
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for i, record in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(record, dict):
            defects.add(where, "(record)", f"expected an object, got {type(record).__name__}", "record dropped")
            dropped += 1
            continue
        uid = record.get("uid")
        if isinstance(uid, bool) or not isinstance(uid, (str, int)):
            defects.add(where, "uid", f"expected a string or an integer, got {_short(uid)}", "record dropped")
            dropped += 1
            continue
        uid = str(uid)
        where = f"{path}: record {i} (uid {uid})"
        if uid in seen:
            raise JobError(f"{where}: field 'uid': duplicate uid (also record {seen[uid]})")
        seen[uid] = i
        text, parts, problem = _read_input(record, config)
        if problem and not labelled:
            defects.add(where, config.input_name, problem)
            text, parts = _unreadable_input(record, config)
            unreadable.append(uid)
            cases.append(Case(uid=uid, text=text, parts=parts))
            continue
        if problem:
            defects.add(where, config.input_name, problem)
            dropped += 1
            continue
        label = None
        if labelled:
            if config.label_name not in record:
                problem = "missing"
            else:
                label = record[config.label_name]
                problem = _check_label(label, ttype, len(parts) if parts is not None else None)
            if problem:
                defects.add(where, config.label_name, problem)
                dropped += 1
                continue
        cases.append(Case(uid=uid, text=text, parts=parts, label=label))
    if labelled and ttype.multi and not ttype.is_ner and cases:
        lengths = Counter(len(c.label) for c in cases)
        # The most common length (ties: the first record's) is the task's; validation takes training's.
        width = label_length if label_length is not None else max(lengths, key=lambda n: lengths[n])
        kept = []
        for c in cases:
            if len(c.label) == width:
                kept.append(c)
            else:
                defects.add(
                    f"{path}: record {seen[c.uid]} (uid {c.uid})",
                    config.label_name,
                    f"expected a list of {width} values (the training labels' length), got {len(c.label)}",
                )
                dropped += 1
        cases = kept
    defects.close()
    return CaseFile(tuple(cases), dropped, tuple(unreadable))


def load_job(input_dir: Path) -> Job:
    """Read and validate a DRAGON job folder as the README's reliability table says.

    The validation file is optional, and one that cannot be read is left out with a warning (it
    only chooses settings); a training set without a usable record leaves the task undefined."""
    input_dir = Path(input_dir)
    config = load_config(input_dir)
    train_path = input_dir / TRAIN_FILE
    train = read_cases(train_path, config, role="train")
    if not train.cases:
        detail = f"all {train.dropped} records are defective (see the warnings)" if train.dropped else "it is empty"
        raise JobError(f"{train_path}: no usable training record: {detail}")
    val_path = input_dir / VALIDATION_FILE
    validation = CaseFile(())
    if val_path.is_file():
        try:
            records = _read_array(val_path)
        except JobError as err:
            log.warning("%s; running without the validation set", err)
        else:
            width = len(train.cases[0].label) if config.task_type.multi and not config.task_type.is_ner else None
            validation = read_cases(val_path, config, role="validation", label_length=width, data=records)
    test = read_cases(input_dir / TEST_FILE, config, role="test")
    counts = (("train", train.dropped), ("validation", validation.dropped), ("test", test.dropped))
    dropped = {role: n for role, n in counts if n}
    return Job(
        config=config,
        train=train.cases,
        validation=validation.cases,
        test=test.cases,
        input_dir=input_dir,
        dropped=dropped,
        unreadable=test.unreadable,
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
    """Write a file complete or not at all: a temp file beside it, fsync, then rename.

    A failure of the file system (no space left, read-only, not a folder) is a JobError naming the
    file; the temp file is removed, so nothing partial is left and an earlier file stays as it was."""
    target = Path(target)
    ensure_folder(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise JobError(f"{target}: cannot write: {_os_reason(err)}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise JobError(f"{target}: cannot write {len(data)} bytes: {_os_reason(err)}; nothing written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_folder(folder: Path) -> None:
    """Create the output folder if needed; a path that is (or runs through) a file, or cannot be
    created, is a JobError naming it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise JobError(f"{folder}: the output path exists and is not a folder")
    blocking = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise JobError(f"{folder}: cannot create the output folder: {blocking} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise JobError(f"{folder}: cannot create the output folder: {_os_reason(err)}") from None


def _os_reason(err: OSError) -> str:
    """An OSError in words, without the file name (the message names it)."""
    name = errno.errorcode.get(err.errno or 0, "")
    reason = err.strerror or str(err)
    return f"{reason} ({name})" if name else reason
