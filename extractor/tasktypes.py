"""The eight DRAGON task types, keyed by the `label_name` a job's configuration names.

Everything that depends on the task type (value types, list shapes, the prediction key) reads
this table, so no module has to spell out `if label_name == ...` chains.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ValueKind(str, Enum):
    """What one label position holds."""

    BINARY = "binary"
    CLASS = "class"
    NUMBER = "number"
    TAGS = "tags"


@dataclass(frozen=True)
class TaskType:
    label_name: str
    kind: ValueKind
    multi: bool  # a list of values (multi-label) rather than one value

    @property
    def prediction_key(self) -> str:
        """The key the predictions file uses: the label name without `_target`."""
        return self.label_name.removesuffix("_target")

    @property
    def is_ner(self) -> bool:
        return self.kind is ValueKind.TAGS


TASK_TYPES: dict[str, TaskType] = {
    t.label_name: t
    for t in (
        TaskType("single_label_binary_classification_target", ValueKind.BINARY, False),
        TaskType("multi_label_binary_classification_target", ValueKind.BINARY, True),
        TaskType("single_label_multi_class_classification_target", ValueKind.CLASS, False),
        TaskType("multi_label_multi_class_classification_target", ValueKind.CLASS, True),
        TaskType("single_label_regression_target", ValueKind.NUMBER, False),
        TaskType("multi_label_regression_target", ValueKind.NUMBER, True),
        TaskType("named_entity_recognition_target", ValueKind.TAGS, False),
        TaskType("multi_label_named_entity_recognition_target", ValueKind.TAGS, True),
    )
}


def task_type(label_name: str) -> TaskType:
    """Look up a label name; the error lists the known ones."""
    try:
        return TASK_TYPES[label_name]
    except KeyError:
        known = ", ".join(sorted(TASK_TYPES))
        raise ValueError(f"unknown label_name {label_name!r}; known: {known}") from None
