"""Choosing training examples: BM25 neighbours per report, or one fixed label-balanced set.

The same neighbours give the nearest-neighbour vote used as the fallback answer. Only the job's
training set is ever searched; the validation set is for choosing settings, never for examples.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_DUTCH, STOPWORDS_EN

from extractor.dragon_io import Case
from extractor.prior import TrainingPrior, median
from extractor.tasktypes import TaskType, ValueKind

log = logging.getLogger(__name__)
# bm25s pins its logger at DEBUG, which prints its index-building lines in an INFO run; follow the
# run's level instead.
logging.getLogger("bm25s").setLevel(logging.NOTSET)

STOPWORDS = sorted(set(STOPWORDS_DUTCH) | set(STOPWORDS_EN))


def _tokens(texts: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, return_ids=False, show_progress=False)


class Retriever:
    """BM25 over the training reports; ties go to the earlier training case (deterministic)."""

    def __init__(self, train: Sequence[Case]) -> None:
        self.train = tuple(train)
        corpus = _tokens([c.content for c in self.train]) if self.train else []
        self._index: bm25s.BM25 | None = None
        if any(corpus):
            self._index = bm25s.BM25()
            self._index.index(corpus, show_progress=False)

    def nearest(self, case: Case, k: int) -> list[int]:
        """Indices of the k most similar training cases, most similar first."""
        if k <= 0 or not self.train:
            return []
        if self._index is None:
            return list(range(min(k, len(self.train))))
        query = _tokens([case.content])[0]
        scores = self._index.get_scores(query) if query else np.zeros(len(self.train))
        order = np.lexsort((np.arange(len(scores)), -np.asarray(scores)))
        return [int(i) for i in order[:k]]


def _balance_key(case: Case, ttype: TaskType, cuts: list[float]) -> Any:
    label = case.label
    if ttype.is_ner:
        flat = [t for w in label for t in (w if ttype.multi else [w])]
        return any(t != "O" for t in flat)
    if ttype.kind is ValueKind.NUMBER:
        values = label if ttype.multi else [label]
        first = next((v for v in values if v is not None), None)
        return -1 if first is None else sum(first > c for c in cuts)
    return tuple(label) if ttype.multi else label


def fixed_examples(train: Sequence[Case], ttype: TaskType, k: int) -> list[int]:
    """A label-balanced set, the same for every report: round-robin over label groups, shortest first."""
    if k <= 0 or not train:
        return []
    cuts: list[float] = []
    if ttype.kind is ValueKind.NUMBER:
        values = [v for c in train for v in (c.label if ttype.multi else [c.label]) if v is not None]
        if len(values) >= 4:
            cuts = list(np.quantile(values, [0.25, 0.5, 0.75]))
    groups: dict[Any, list[int]] = {}
    for i, case in enumerate(train):
        groups.setdefault(_balance_key(case, ttype, cuts), []).append(i)
    queues = [
        sorted(idx, key=lambda i: (len(train[i].content), i))
        for _, idx in sorted(groups.items(), key=lambda kv: repr(kv[0]))
    ]
    chosen: list[int] = []
    while len(chosen) < k and any(queues):
        for queue in queues:
            if queue and len(chosen) < k:
                chosen.append(queue.pop(0))
    return chosen


def _norm_word(word: str) -> str:
    return word.strip().lower()


class NeighbourVote:
    """The k nearest training reports' vote: mean probability, majority label, median value,
    per-word tag lookup for NER. Falls back to the training prior where the neighbours say nothing."""

    name = "vote"

    def __init__(self, train: Sequence[Case], ttype: TaskType, retriever: Retriever, k: int) -> None:
        self.train = tuple(train)
        self.ttype = ttype
        self.retriever = retriever
        self.k = k
        self.prior = TrainingPrior(train, ttype)

    def __call__(self, case: Case) -> Any:
        idx = self.retriever.nearest(case, self.k)
        if not idx:
            return self.prior(case)
        labels = [self.train[i].label for i in idx]
        if self.ttype.is_ner:
            return self._tags(case, idx)
        if not self.ttype.multi:
            return self._vote([lab for lab in labels], self.prior.value)
        return [self._vote([lab[j] for lab in labels], self.prior.value[j]) for j in range(len(self.prior.value))]

    def shares(self, case: Case) -> list[dict[Any, float]]:
        """Per label position, the share of neighbours voting for each label (classification only)."""
        idx = self.retriever.nearest(case, self.k)
        labels = [self.train[i].label for i in idx]
        columns = (
            [[lab[j] for lab in labels] for j in range(len(labels[0]))] if self.ttype.multi and labels else [labels]
        )
        out = []
        for column in columns:
            present = [v for v in column if v is not None]
            counts = Counter(present)
            out.append({lab: n / len(present) for lab, n in counts.items()} if present else {})
        return out

    def _vote(self, values: list[Any], default: Any) -> Any:
        present = [v for v in values if v is not None]
        if not present:
            return default
        kind = self.ttype.kind
        if kind is ValueKind.BINARY:
            return float(sum(bool(v) for v in present) / len(present))
        if kind is ValueKind.CLASS:
            counts = Counter(present)
            return max(counts, key=lambda lab: (counts[lab], lab == default))
        return median(present)

    def _tags(self, case: Case, idx: list[int]) -> Any:
        seen: dict[str, Counter[Any]] = {}
        for i in idx:
            neighbour = self.train[i]
            for word, tags in zip(neighbour.parts or (), neighbour.label, strict=False):
                key = tuple(tags) if self.ttype.multi else tags
                seen.setdefault(_norm_word(word), Counter())[key] += 1
        out: list[Any] = []
        for word in case.parts or ():
            counts = seen.get(_norm_word(word))
            if not counts:
                out.append(["O"] if self.ttype.multi else "O")
                continue
            best = max(counts, key=lambda key: (counts[key], str(key)))
            out.append(list(best) if self.ttype.multi else best)
        return out


def example_picker(strategy: str, k: int, train: Sequence[Case], ttype: TaskType, retriever: Retriever | None):
    """A function giving each report its examples, least similar first (the nearest sits next to
    the report), or None for zero-shot."""
    if strategy == "none" or k <= 0 or not train:
        return None
    if strategy == "fixed":
        chosen = [train[i] for i in fixed_examples(train, ttype, k)]
        log.info("fixed examples: %s", [c.uid for c in chosen])
        return lambda case: chosen
    if retriever is None:
        raise ValueError("retrieved examples need a retriever")
    return lambda case: [train[i] for i in reversed(retriever.nearest(case, k))]
