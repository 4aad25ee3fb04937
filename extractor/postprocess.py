"""Answers to DRAGON prediction values, as pure functions.

Binary fields become probabilities from the model's likelihoods, label fields the most likely
training label (or, for ordinal labels, the one with the lowest expected linear cost), numbers
floats, and entity lists BIO tags aligned to the job's words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from extractor.taskfiles import NUMBERED_TAG, NerSpec, OutputField, Taskfile

MAX_ENTITY_WORDS = 64
POSITION_TOLERANCE = 2  # a start this many words off still counts as the entity's position


def probability_true(likelihoods: Mapping[str, float] | None, answer: bool) -> float:
    """P(true) from the log-likelihoods of `true` and `false`; the hard answer when absent."""
    if not likelihoods or "true" not in likelihoods or "false" not in likelihoods:
        return 1.0 if answer else 0.0
    lt, lf = likelihoods["true"], likelihoods["false"]
    if not (math.isfinite(lt) or math.isfinite(lf)):
        return 1.0 if answer else 0.0
    diff = lf - lt
    if diff > 700:
        return 0.0
    return float(min(max(1.0 / (1.0 + math.exp(diff)), 0.0), 1.0))


def most_likely_label(likelihoods: Mapping[str, float] | None, answer: str, labels: Sequence[str]) -> str:
    """The allowed label with the highest likelihood (literals are JSON strings); else the answer."""
    if likelihoods:
        scored = [(likelihoods.get(orjson.dumps(lab).decode(), -math.inf), lab) for lab in labels]
        best_score, best = max(scored, key=lambda pair: pair[0])
        if math.isfinite(best_score):
            return best
    return answer if answer in labels else labels[0]


def ordinal_ranks(labels: Sequence[str]) -> dict[str, int]:
    """Each label's rank as dragon-eval's linear kappa sees it: sklearn orders the labels by
    sorting them (as strings), whatever they mean."""
    return {lab: i for i, lab in enumerate(sorted(labels))}


def label_probabilities(likelihoods: Mapping[str, float] | None, labels: Sequence[str]) -> list[float] | None:
    """Softmax of the labels' log-likelihoods (literals are JSON strings); None when none is finite."""
    if not likelihoods:
        return None
    scores = [likelihoods.get(orjson.dumps(lab).decode(), -math.inf) for lab in labels]
    top = max(scores, default=-math.inf)
    if not math.isfinite(top):
        return None
    exp = [math.exp(s - top) for s in scores]
    total = sum(exp)
    return [e / total for e in exp]


def min_expected_cost_label(probs: Sequence[float], labels: Sequence[str]) -> str:
    """The label minimising the expected |rank - true rank| (a weighted median); ties go to the
    more probable label, then the earlier one."""
    ranks = ordinal_ranks(labels)

    def cost(j: int) -> float:
        return sum(p * abs(ranks[labels[j]] - ranks[lab]) for p, lab in zip(probs, labels, strict=True))

    return labels[min(range(len(labels)), key=lambda j: (round(cost(j), 12), -probs[j], j))]


def decide_label(field: OutputField, likelihoods: Mapping[str, float] | None, answer: str) -> str:
    """The label field's value under the field's decision rule."""
    labels = list(field.labels or ())
    if field.decision == "min_expected_cost":
        probs = label_probabilities(likelihoods, labels)
        if probs is not None:
            return min_expected_cost_label(probs, labels)
    return most_likely_label(likelihoods, answer, labels)


def field_value(field: OutputField, value: Any, likelihoods: Mapping[str, float] | None) -> Any:
    if field.type == "boolean":
        return probability_true(likelihoods, bool(value))
    if field.type == "label":
        return decide_label(field, likelihoods, value)
    if field.type == "number":
        if isinstance(field.missing_value, str):
            raise ValueError(
                f"field {field.name!r}: missing_value {field.missing_value!r} was not resolved from the training set"
            )
        if value is None or not math.isfinite(float(value)):
            return float(field.missing_value)
        return float(value)
    raise ValueError(f"field {field.name!r}: entities need the case's words (use entities_to_tags)")


def _norm(text: str) -> str:
    return "".join(text.split()).lower()


def match_at(words: Sequence[str], start: int, target: str) -> int | None:
    """End (exclusive) of the word run from `start` whose joined text equals `target`.

    Comparison ignores case and white space, so the model's "3.8 mm." matches words
    ["3.8", "mm", "."] as well as ["3.8", "mm."].
    """
    if not target or not 0 <= start < len(words):
        return None
    acc = ""
    for k in range(start, min(len(words), start + MAX_ENTITY_WORDS)):
        acc += _norm(words[k])
        if acc == target:
            return k + 1
        if not target.startswith(acc):
            return None
    return None


def find_spans(words: Sequence[str], target: str) -> list[tuple[int, int]]:
    """Every non-overlapping occurrence of `target` in the words, left to right."""
    spans, s = [], 0
    while s < len(words):
        end = match_at(words, s, target) if _norm(words[s]) else None
        if end is not None:
            spans.append((s, end))
            s = end
        else:
            s += 1
    return spans


@dataclass(frozen=True)
class Placed:
    start: int
    end: int
    label: str  # tag name without B-/I-: "lesion", "3-lesion", "<DATUM>"


def _span_from_position(
    ent: Mapping[str, Any], words: Sequence[str], target: str, max_chars: int
) -> tuple[int, int] | None:
    """The entity's own span, or None when its position is unusable.

    The text found at (or next to) `start` wins, unless the text was written abbreviated (long
    entities hit the length bound): then `start`..`end` is used if the span begins with that text.
    """
    start, end = ent.get("start"), ent.get("end")
    if not isinstance(start, int):
        return None
    by_text = None
    for offset in sorted(range(-POSITION_TOLERANCE, POSITION_TOLERANCE + 1), key=abs):
        stop = match_at(words, start + offset, target)
        if stop is not None:
            by_text = (start + offset, stop)
            break
    by_range = None
    if isinstance(end, int) and 0 <= start <= end < len(words) and target:
        if _norm("".join(words[start : end + 1])).startswith(target):
            by_range = (start, end + 1)
    abbreviated = len(str(ent.get("text", ""))) >= 0.9 * max_chars
    if by_range and (by_text is None or abbreviated):
        return by_range
    return by_text


def marker_end(words: Sequence[str], markers: Sequence[str]) -> int | None:
    """Index just after the first word that is one of the marker words (case-insensitive)."""
    wanted = {_norm(m) for m in markers if _norm(m)}
    for k, word in enumerate(words):
        if _norm(word) in wanted:
            return k + 1
    return None


def _fallback_spans(
    spans: list[tuple[int, int]], kind: str, placed: Sequence[Placed], after: int | None, ner: NerSpec
) -> list[tuple[int, int]]:
    """Where an entity without a usable position goes, among the occurrences of its text."""
    if after is not None and any(s >= after for s, _ in spans):
        spans = [(s, e) for s, e in spans if s >= after]
    if ner.unplaced == "all":
        return spans
    taken = [(p.start, p.end) for p in placed if split_label(p.label, numbered=ner.numbered)[1] == kind]
    free = [(s, e) for s, e in spans if not any(s < te and ts < e for ts, te in taken)]
    return (free or spans)[:1]


def place_entities(entities: Sequence[Mapping[str, Any]], words: Sequence[str], tf: Taskfile) -> list[Placed]:
    """Resolve each entity to word spans: its own position when usable, else the Taskfile's fallback
    (after every positioned entity, so a fallback can avoid occurrences another item already holds)."""
    ner = tf.ner
    assert ner is not None
    placed: list[Placed] = []
    unplaced: list[tuple[str, str, str]] = []
    for ent in entities:
        target = _norm(str(ent.get("text", "")))
        kind = str(ent["type"])
        label = f"{ent['item']}-{kind}" if ner.numbered else kind
        span = _span_from_position(ent, words, target, ner.max_text_chars)
        if span is not None:
            placed.append(Placed(span[0], span[1], label))
        else:
            unplaced.append((target, kind, label))
    after = marker_end(words, ner.unplaced_after) if ner.unplaced_after else None
    for target, kind, label in unplaced:
        spans = _fallback_spans(find_spans(words, target), kind, placed, after, ner)
        placed += [Placed(s, e, label) for s, e in spans]
    return placed


def spans_to_tags(placed: Sequence[Placed], n_words: int, *, multi: bool) -> list[Any]:
    """BIO tags per word; single-label keeps the first entity where spans overlap."""
    ordered = sorted(placed, key=lambda p: (p.start, -(p.end - p.start), p.label))
    if not multi:
        tags = ["O"] * n_words
        for p in ordered:
            if p.end > n_words or any(t != "O" for t in tags[p.start : p.end]):
                continue
            tags[p.start] = f"B-{p.label}"
            for k in range(p.start + 1, p.end):
                tags[k] = f"I-{p.label}"
        return tags
    lists: list[list[str]] = [[] for _ in range(n_words)]
    for p in ordered:
        if p.end > n_words or any(t[2:] == p.label for k in range(p.start, p.end) for t in lists[k]):
            continue
        lists[p.start].append(f"B-{p.label}")
        for k in range(p.start + 1, p.end):
            lists[k].append(f"I-{p.label}")
    return [sorted(t) if t else ["O"] for t in lists]


def entities_to_tags(entities: Sequence[Mapping[str, Any]], words: Sequence[str], tf: Taskfile) -> list[Any]:
    return spans_to_tags(place_entities(entities, words, tf), len(words), multi=tf.task_type.multi)


def tags_to_spans(tags: Sequence[Any], *, multi: bool) -> list[Placed]:
    """Entity spans of a BIO sequence, read as seqeval reads it (an I- after O starts an entity)."""
    per_word = [list(t) for t in tags] if multi else [[t] for t in tags]
    labels = sorted({t[2:] for word in per_word for t in word if t != "O" and len(t) > 2})
    spans: list[Placed] = []
    for label in labels:
        start = None
        for k, word in enumerate(per_word + [[]]):
            has_b, has_i = f"B-{label}" in word, f"I-{label}" in word
            if start is not None and not has_i:
                spans.append(Placed(start, k, label))
                start = None
            if has_b or (has_i and start is None):
                if start is not None:
                    spans.append(Placed(start, k, label))
                start = k
    return sorted(spans, key=lambda p: (p.start, p.end, p.label))


def split_label(label: str, *, numbered: bool) -> tuple[int | None, str]:
    """ "3-lesion" -> (3, "lesion") for numbered tags; (None, label) otherwise."""
    if numbered:
        m = NUMBERED_TAG.match(label)
        if m:
            return int(m.group(1)), m.group(2)
    return None, label


def to_prediction(
    answer: Mapping[str, Any],
    likelihoods: Mapping[str, Mapping[str, float]],
    tf: Taskfile,
    words: Sequence[str] | None,
) -> Any:
    """The DRAGON prediction value for one case from its validated answer."""
    ttype = tf.task_type
    if ttype.is_ner:
        field = tf.fields[0]
        return entities_to_tags(answer.get(field.name) or [], words or (), tf)
    values = [field_value(f, answer.get(f.name), likelihoods.get(f.name)) for f in tf.fields]
    return values if ttype.multi else values[0]


def blend_with_vote(
    prediction: Any,
    likelihoods: Mapping[str, Mapping[str, float]],
    vote: Any,
    shares: Sequence[Mapping[Any, float]],
    weight: float,
    tf: Taskfile,
) -> Any:
    """Mix the neighbours' vote into the model's scores: probabilities are averaged with weight
    `weight`, labels chosen by the weighted sum of model probability and vote share. Numbers and
    entities stay the model's."""
    if weight <= 0.0 or tf.task_type.is_ner:
        return prediction
    multi = tf.task_type.multi
    preds = list(prediction) if multi else [prediction]
    votes = list(vote) if multi else [vote]
    out = []
    for i, (field, pred) in enumerate(zip(tf.fields, preds, strict=True)):
        if field.type == "boolean":
            out.append(float((1.0 - weight) * pred + weight * float(votes[i])))
        elif field.type == "label":
            labels = list(field.labels or ())
            model_p = label_probabilities(likelihoods.get(field.name), labels)
            if model_p is None:
                model_p = [1.0 if lab == pred else 0.0 for lab in labels]
            share = shares[i] if i < len(shares) else {}
            mixed = [(1.0 - weight) * p + weight * share.get(lab, 0.0) for p, lab in zip(model_p, labels, strict=True)]
            if field.decision == "min_expected_cost":
                out.append(min_expected_cost_label(mixed, labels))
            else:
                out.append(labels[max(range(len(labels)), key=lambda j: (mixed[j], -j))])
        else:
            out.append(pred)
    return out if multi else out[0]
