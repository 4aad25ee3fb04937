"""Prompts: fixed instructions first, the report last, fitted to a token budget.

Everything before the report is identical for every case of a job, so the engine's KV cache
reuses it after the first report. Reports stay in their own language.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from extractor.backend import ChatTokenizer, Message, Request
from extractor.dragon_io import Case
from extractor.gold import label_to_answer
from extractor.schema import REASONING_FIELD, answer_schema, score_choices
from extractor.taskfiles import NerSpec, OutputField, Taskfile
from extractor.tasktypes import ValueKind

SYSTEM_PREAMBLE = (
    "You are a careful clinical data abstractor. You read one medical report at a time and answer "
    "questions about it with a single JSON object. Answer from the report alone; the report may be "
    "in Dutch: read it in Dutch, do not translate it."
)
SAFETY_MARGIN_TOKENS = 8


def _describe_field(field: OutputField, tf: Taskfile) -> str:
    meanings: list[str] = []
    if field.type == "boolean":
        kind = "true or false"
    elif field.type == "label":
        kind = "one of " + ", ".join(orjson.dumps(lab).decode() for lab in field.labels or ())
        meanings = [
            f"  - {orjson.dumps(lab).decode()}: {field.label_descriptions[lab]}"
            for lab in field.labels or ()
            if lab in field.label_descriptions
        ]
    elif field.type == "number":
        kind = "a number" + (", or null when the report does not give it" if field.nullable else "")
    else:
        assert tf.ner is not None
        item = ', "item": the item number' if tf.ner.numbered else ""
        types = ", ".join(orjson.dumps(t).decode() for t in tf.ner.entity_types)
        kind = (
            'a list of entities, each {"start": number of its first word, "text": its words as written, '
            f'"end": number of its last word, "type": one of {types}{item}}}'
        )
    text = f'- "{field.name}": {kind}.'
    if field.description:
        text += f" {field.description}"
    return "\n".join([text, *meanings])


def entity_type_lines(ner: NerSpec) -> list[str]:
    """One line per entity type of the job (its training tags), with the Taskfile's description;
    spellings of one type share a line, and descriptions of types the job lacks are left out."""
    lines = []
    for tags, desc in ner.described_types():
        name = " or ".join(tags)
        if len(tags) > 1:
            name += " (the training data spell this type in more than one way; follow the examples)"
        lines.append(f"- {name}: {desc}" if desc else f"- {name}")
    return lines


def system_prompt(tf: Taskfile, *, reasoning: bool) -> str:
    """The fixed part of every prompt of a job: role, task instructions and the answer format."""
    lines = [SYSTEM_PREAMBLE, "", "Task:", tf.instructions.strip(), ""]
    if tf.ner is not None and tf.ner.type_descriptions:
        lines.append("Entity types:")
        lines += entity_type_lines(tf.ner)
        lines.append("")
    if tf.input.kind == "words":
        lines.append(
            "The report is given as numbered words, [n]word. Give each entity the numbers of its first and last word."
        )
        lines.append("")
    lines.append("Answer with one JSON object with these keys, in this order:")
    if reasoning:
        lines.append(
            f'- "{REASONING_FIELD}": a short explanation (at most {tf.reasoning.max_chars} characters) '
            "of what in the report decides the answer."
        )
    lines += [_describe_field(f, tf) for f in tf.fields]
    return "\n".join(lines)


def render_case(parts: Sequence[str] | None, text: str | None, tf: Taskfile, first_word: int = 0) -> str:
    """The case as the model sees it: plain text, labelled parts, or numbered words."""
    kind = tf.input.kind
    if kind == "words":
        return " ".join(f"[{first_word + i}]{w}" for i, w in enumerate(parts or ()))
    if kind in ("sentence_pair", "block_report") and parts is not None:
        names = list(tf.input.part_names) or [f"Part {i + 1}" for i in range(len(parts))]
        names += [f"Part {i + 1}" for i in range(len(names), len(parts))]
        return "\n".join(f"{name}: {part}" for name, part in zip(names, parts, strict=False))
    return text if text is not None else "\n".join(parts or ())


def messages_for(
    tf: Taskfile, case_text: str, *, reasoning: bool, examples: Sequence[tuple[str, str]] = ()
) -> tuple[Message, ...]:
    """System instructions, then solved examples as earlier turns, then the report."""
    turns = [Message("system", system_prompt(tf, reasoning=reasoning))]
    for report, answer in examples:
        turns += [Message("user", "Report:\n" + report), Message("assistant", answer)]
    turns.append(Message("user", "Report:\n" + case_text))
    return tuple(turns)


def render_example(case: Case, tf: Taskfile, side: str) -> tuple[str, str]:
    """A training case as a solved example: its report (capped at the Taskfile's length) and the
    exact JSON answer the model should give for it (without reasoning: none is known)."""
    limit = tf.examples.max_chars
    answer = label_to_answer(case.label, case.parts, tf)
    by_answer = tf.examples.window == "answer"
    if tf.input.kind == "words":
        words = case.parts or ()
        spans = [(e["start"], e["end"] + 1) for e in answer[tf.fields[0].name]]
        window = answer_word_window(words, spans, limit) if by_answer else None
        first, last = window or (0, len(words))
        while window is None and last - first > 1 and len(render_case(words[first:last], None, tf, first)) > limit:
            if side == "left":
                first += 1
            else:
                last -= 1
        field = tf.fields[0].name
        answer = {field: [e for e in answer[field] if first <= e["start"] and e["end"] < last]}
        text = render_case(words[first:last], None, tf, first)
    elif case.parts is not None and case.text is None:
        parts = list(case.parts)
        if parts:
            room = max(limit - sum(len(p) for p in parts[:-1]), 1)
            evidence = answer_evidence(parts[-1], case.label, tf) if by_answer else []
            parts[-1] = _cut_chars(parts[-1], room, side, evidence)
        text = render_case(parts, None, tf)
    else:
        evidence = answer_evidence(case.text or "", case.label, tf) if by_answer else []
        text = _cut_chars(case.text or "", limit, side, evidence)
    return text, orjson.dumps(answer).decode()


def _cut_chars(text: str, limit: int, side: str, evidence: Sequence[tuple[int, int]] = ()) -> str:
    """The first or last `limit` characters, or, given evidence spans, the window holding most of them."""
    if len(text) <= limit:
        return text
    if evidence:
        start = best_window(evidence, limit, len(text))
        return text[start : start + limit]
    return text[len(text) - limit :] if side == "left" else text[:limit]


def number_forms(value: float) -> set[str]:
    """How a report may write a number: up to three decimals, with a decimal point or comma."""
    forms = set()
    for decimals in range(4):
        written = f"{value:.{decimals}f}"
        if abs(float(written) - value) <= 1e-9 * max(1.0, abs(value)):
            forms |= {written, written.replace(".", ",")}
    return forms


def answer_evidence(text: str, label: Any, tf: Taskfile) -> list[tuple[int, int]]:
    """Character spans of `text` the answer comes from: where a number label is written, else
    where the Taskfile's anchor words occur (case-insensitive). Empty when neither is found."""
    spans: list[tuple[int, int]] = []
    if tf.task_type.kind is ValueKind.NUMBER:
        for value in label if tf.task_type.multi else [label]:
            if value is None:
                continue
            for form in number_forms(float(value)):
                pattern = rf"(?<![\d.,]){re.escape(form)}(?![\d]|[.,]\d)"
                spans += [m.span() for m in re.finditer(pattern, text)]
    if not spans:
        for anchor in tf.examples.anchors:
            spans += [m.span() for m in re.finditer(re.escape(anchor), text, flags=re.IGNORECASE)]
    return sorted(set(spans))


def best_window(spans: Sequence[tuple[int, int]], limit: int, length: int) -> int:
    """Start of the window of `limit` positions (out of `length`) holding the most spans whole;
    each candidate window opens a quarter of its width before a span, the earliest wins ties."""
    margin = limit // 4
    best_start, best_count = 0, -1
    for span_start, _ in sorted(spans):
        start = min(max(span_start - margin, 0), max(length - limit, 0))
        count = sum(start <= s and e <= start + limit for s, e in spans)
        if count > best_count:
            best_start, best_count = start, count
    return best_start


def answer_word_window(words: Sequence[str], spans: Sequence[tuple[int, int]], limit: int) -> tuple[int, int] | None:
    """The run of numbered words, rendered within `limit` characters, holding the most entities
    whole (spans are word ranges, end exclusive); None when all fits or there is no entity."""
    sizes = [len(f"[{i}]{w}") + 1 for i, w in enumerate(words)]
    if not spans or sum(sizes) - 1 <= limit:
        return None
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    best: tuple[int, int, int] | None = None
    for first in sorted({max(s - 3, 0) for s, _ in spans} | {0}):
        last = first + 1
        while last < len(words) and prefix[last + 1] - prefix[first] - 1 <= limit:
            last += 1
        count = sum(first <= s and e <= last for s, e in spans)
        if best is None or count > best[0]:
            best = (count, first, last)
    assert best is not None
    return best[1], best[2]


ExamplePicker = Callable[[Case], Sequence[Case]]


@dataclass(frozen=True)
class PromptPlan:
    """One case's prompt and what fitting it to the context cost."""

    request: Request
    truncated: bool
    examples: int = 0


class PromptBuilder:
    """Builds requests for one job: renders, counts with the model's tokenizer, fits the context.

    Too long a prompt first loses its least similar examples, then has its report cut on the
    job's truncation side.
    """

    def __init__(
        self,
        tf: Taskfile,
        tokenizer: ChatTokenizer,
        *,
        truncation_side: str,
        context_limit: int,
        examples: ExamplePicker | None = None,
    ) -> None:
        self.tf = tf
        self.tokenizer = tokenizer
        self.side = truncation_side
        self.context_limit = min(context_limit, tokenizer.context_limit)
        self.choices = score_choices(tf)
        self.pick_examples = examples
        self._rendered: dict[str, tuple[str, str]] = {}

    def _examples_for(self, case: Case) -> list[tuple[str, str]]:
        if self.pick_examples is None:
            return []
        shown = []
        for ex in self.pick_examples(case):
            if ex.uid not in self._rendered:
                self._rendered[ex.uid] = render_example(ex, self.tf, self.side)
            shown.append(self._rendered[ex.uid])
        return shown

    def _count(self, messages: Sequence[Message]) -> tuple[str, int]:
        return self.tokenizer.render(messages), len(self.tokenizer.encode(messages))

    def build(
        self, case: Case, *, reasoning: bool, max_tokens: int, attempt: int = 1, use_examples: bool = True
    ) -> PromptPlan:
        """Render one case with its examples, fitted to the context."""
        tf = self.tf
        max_tokens = min(max_tokens, self.context_limit // 2)
        budget = self.context_limit - max_tokens - SAFETY_MARGIN_TOKENS
        examples = self._examples_for(case) if use_examples else []
        case_text = render_case(case.parts, case.text, tf)
        messages = messages_for(tf, case_text, reasoning=reasoning, examples=examples)
        prompt, n_tokens = self._count(messages)
        while n_tokens > budget and examples:
            examples = examples[1:]  # the least similar example goes first
            messages = messages_for(tf, case_text, reasoning=reasoning, examples=examples)
            prompt, n_tokens = self._count(messages)
        truncated = n_tokens > budget
        if truncated:
            parts, text, first_word = case.parts, case.text, 0
            _, empty = self._count(messages_for(tf, "", reasoning=reasoning))
            allowed = max(budget - empty, 1)
            if tf.input.kind == "words":
                parts, first_word = self._fit_words(parts or (), allowed)
            elif parts and text is None:
                last = self._cut(parts[-1], allowed - self._count_tokens("\n".join(parts[:-1])))
                parts = (*parts[:-1], last)
            else:
                text = self._cut(text or "", allowed)
            messages = messages_for(tf, render_case(parts, text, tf, first_word), reasoning=reasoning)
            prompt, n_tokens = self._count(messages)
        request = Request(
            uid=case.uid,
            messages=messages,
            prompt=prompt,
            prompt_tokens=n_tokens,
            schema=answer_schema(tf, reasoning=reasoning),
            max_tokens=max_tokens,
            choices=self.choices,
            attempt=attempt,
        )
        return PromptPlan(request=request, truncated=truncated, examples=len(examples))

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer.tokenize(text)) if text else 0

    def _cut(self, text: str, allowed: int) -> str:
        tokens = self.tokenizer.tokenize(text)
        if len(tokens) <= allowed:
            return text
        allowed = max(allowed, 0)
        kept = tokens[len(tokens) - allowed :] if self.side == "left" else tokens[:allowed]
        return self.tokenizer.detokenize(kept)

    def _fit_words(self, words: Sequence[str], allowed: int) -> tuple[tuple[str, ...], int]:
        """Keep the longest run of whole words that fits; words cut off are tagged O later."""
        lo, hi = 0, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            kept = words[len(words) - mid :] if self.side == "left" else words[:mid]
            first = len(words) - mid if self.side == "left" else 0
            if self._count_tokens(render_case(kept, None, self.tf, first)) <= allowed:
                lo = mid
            else:
                hi = mid - 1
        first = len(words) - lo if self.side == "left" else 0
        kept = words[first:] if self.side == "left" else words[:lo]
        return tuple(kept), first
