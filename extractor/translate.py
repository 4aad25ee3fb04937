"""Optional pre-pass that has the model translate each report to English (ablation only).

The published zero-shot system found that translating Dutch reports first hurt every model; this
pass exists so users can reproduce that. Off by default, and never for NER tasks (word positions
would no longer match). The same backend and greedy decoding, without a grammar.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from extractor.backend import ChatTokenizer, Generator, Message, Request, StopRequested
from extractor.dragon_io import Case
from extractor.taskfiles import Taskfile

log = logging.getLogger(__name__)

SYSTEM = (
    "Translate the medical text the user sends into English. Keep every number, unit, date, "
    "measurement and name exactly as written. Answer with the translation only."
)


def translatable_parts(case: Case, tf: Taskfile) -> list[str]:
    """The pieces of a case that are translated: the report text, or each part except a block numeral."""
    if case.text is not None:
        return [case.text]
    parts = list(case.parts or ())
    return parts[1:] if tf.input.kind == "block_report" else parts


def translation_requests(
    cases: Sequence[Case], tf: Taskfile, tokenizer: ChatTokenizer, context_limit: int
) -> list[Request]:
    requests = []
    for case in cases:
        for j, piece in enumerate(translatable_parts(case, tf)):
            messages = (Message("system", SYSTEM), Message("user", piece))
            prompt = tokenizer.render(messages)
            n = len(tokenizer.encode(messages))
            budget = max(min(2 * len(tokenizer.tokenize(piece)) + 16, context_limit - n - 8), 1)
            requests.append(Request(f"{case.uid}\x00{j}", messages, prompt, n, {}, budget))
    return requests


def translate_cases(
    cases: Sequence[Case], tf: Taskfile, backend: Generator, tokenizer: ChatTokenizer, context_limit: int
) -> tuple[list[Case], int]:
    """Cases with their text replaced by the model's translation; untranslatable pieces stay as they were."""
    if tf.task_type.is_ner:
        raise ValueError("translation is not offered for NER tasks: word positions would no longer match")
    done: dict[str, str] = {}
    failed = 0
    try:
        for result in backend.generate(
            translation_requests([c for c in cases if not c.is_blank], tf, tokenizer, context_limit)
        ):
            if result.error or not result.text.strip():
                failed += 1
                continue
            done[result.uid] = result.text.strip()
    except StopRequested:
        # The stop flag stays set: generation ends at once and the job writes its fallback answers.
        log.warning("stopped by a signal during translation: %d pieces translated", len(done))
    out = []
    for case in cases:
        pieces = translatable_parts(case, tf)
        new = [done.get(f"{case.uid}\x00{j}", piece) for j, piece in enumerate(pieces)]
        if case.text is not None:
            out.append(dataclasses.replace(case, text=new[0]))
        else:
            head = list(case.parts or ())[: len(case.parts or ()) - len(pieces)]
            out.append(dataclasses.replace(case, parts=tuple(head + new)))
    if failed:
        log.warning("%d pieces could not be translated and stay in their own language", failed)
    return out, failed
