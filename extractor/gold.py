"""Known labels rendered as the answer a perfect model would give, in the Taskfile's format.

The perfect-answer backend uses it to test prompts-to-predictions end to end, and solved
examples in prompts use it to show the model exactly what to write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from extractor.postprocess import split_label, tags_to_spans
from extractor.taskfiles import Taskfile


def label_to_answer(label: Any, words: Sequence[str] | None, tf: Taskfile) -> dict[str, Any]:
    """The answer object (without reasoning) whose post-processing reproduces `label`."""
    ttype = tf.task_type
    if ttype.is_ner:
        assert tf.ner is not None
        entities = []
        for span in tags_to_spans(label, multi=ttype.multi):
            item, kind = split_label(span.label, numbered=tf.ner.numbered)
            text = " ".join(words[span.start : span.end])[: tf.ner.max_text_chars].strip() or "?"
            entity: dict[str, Any] = {"start": span.start, "text": text, "end": span.end - 1, "type": kind}
            if tf.ner.numbered:
                entity["item"] = item
            entities.append(entity)
        return {tf.fields[0].name: entities}
    values = list(label) if ttype.multi else [label]
    return {field.name: value for field, value in zip(tf.fields, values, strict=False)}
