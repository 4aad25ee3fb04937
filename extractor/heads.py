"""Lexical heads: small supervised models trained on the job's training set in seconds.

Candidates beside the LLM and the neighbour vote, chosen per task on the validation set:
- classification: TF-IDF (word 1-2-grams, char 2-5-grams) with logistic regression, one model per
  label position; probabilities on binary fields, training labels on label fields;
- regression: which number in the report is the answer (a classifier over the numbers found,
  Dutch decimal commas included, with the unit factor as part of its class);
- NER: a per-word classifier on the word, its shape and affixes and three neighbours each side, BIO
  repair, only training tags; numbered items (multi-label NER) from learned item markers.

Only `Case.label` of the training cases is read; validation and test cases are only predicted.
Everything is seeded (fixed `random_state`) and sparse, with bounded vocabularies.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import FeatureUnion
from threadpoolctl import threadpool_limits

from extractor.dragon_io import Case
from extractor.prior import TrainingPrior
from extractor.tasktypes import TaskType, ValueKind

log = logging.getLogger(__name__)

MIN_RECORDS = 10  # fewer usable training records than this: no head, the caller uses the prior
WORD_FEATURES = 50_000
CHAR_FEATURES = 100_000
SPARSE_FEATURES = 200_000  # vocabulary bound for the number and word feature lists
MAX_ITER = 2000


def single_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run with one BLAS/OpenMP thread: these models are small, and on a shared CPU the default
    thread pools made training ten times slower (measured on 2 busy cores)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with threadpool_limits(limits=1):
            return fn(*args, **kwargs)

    return wrapper


class Head(Protocol):
    """A trained candidate: DRAGON prediction values for cases, as `verify_predictions` accepts."""

    name: str

    def predict(self, cases: Sequence[Case]) -> list[Any]: ...


# ----- classification ----------------------------------------------------------------------


def case_text(case: Case) -> str:
    """The text a bag-of-words model reads; the parts of a pair input are marked so that words of
    the premise and of the hypothesis differ (part 2's words get a `p1_` twin)."""
    if case.text is not None:
        return case.text
    parts = case.parts or ()
    if len(parts) < 2:
        return " ".join(parts)
    tagged = [" ".join(f"p{i}_{w}" for w in re.findall(r"\w+", part.lower())) for i, part in enumerate(parts) if i]
    return " | ".join([*parts, *tagged])


def _numbers_as_token(text: str) -> str:
    return NUMBER.sub(" NUM ", text.lower())


def _vectorizer(counts: bool) -> Any:
    """TF-IDF word 1-2-grams and char 2-5-grams; with `counts`, also raw counts of word 2-4-grams
    with numbers replaced by one token, so that a linear model can count ("3 lesions of NUM cm")."""
    extra = (
        [
            (
                "counts",
                CountVectorizer(  # raw counts: a linear model can tell 2 from 3 occurrences
                    ngram_range=(2, 4),
                    max_features=WORD_FEATURES,
                    preprocessor=_numbers_as_token,
                    token_pattern=r"(?u)\b\w+\b",
                    dtype=np.float64,
                ),
            )
        ]
        if counts
        else []
    )
    return FeatureUnion(
        [
            *extra,
            (
                "word",
                TfidfVectorizer(
                    ngram_range=(1, 2), max_features=WORD_FEATURES, sublinear_tf=True, token_pattern=r"(?u)\b\w+\b"
                ),
            ),
            (
                "char",
                TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), max_features=CHAR_FEATURES, sublinear_tf=True),
            ),
        ]
    )


@dataclass
class _Column:
    """One label position: a fitted model, or a constant when training had one class."""

    model: LogisticRegression | None
    constant: Any
    classes: list[Any]


def _fit_column(x: Any, y: list[Any], *, c: float, seed: int) -> _Column:
    classes = sorted(set(y), key=str)
    if len(classes) < 2:
        return _Column(None, classes[0] if classes else None, classes)
    model = LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed, class_weight="balanced")
    model.fit(x, [str(v) for v in y])
    return _Column(model, None, classes)


def _column_probs(col: _Column, x: Any) -> list[dict[Any, float]]:
    if col.model is None:
        return [{col.constant: 1.0} for _ in range(x.shape[0])]
    by_name = {str(c): c for c in col.classes}
    p = col.model.predict_proba(x)
    names = [by_name[str(c)] for c in col.model.classes_]
    return [dict(zip(names, (float(v) for v in row), strict=True)) for row in p]


def _ordinal_key(label: Any) -> float | None:
    try:
        return float(label)
    except (TypeError, ValueError):
        return None


class ClassificationHead:
    """TF-IDF + logistic regression per label position.

    `decode="argmax"` answers the most probable label; `decode="median"` the median of the label
    distribution in numeric order (what minimises the expected linear-kappa loss on ordinal
    labels such as "0".."4"); it exists only when every training label is a number.
    """

    def __init__(
        self,
        name: str,
        ttype: TaskType,
        vectorizer: Any,
        columns: list[_Column],
        prior: TrainingPrior,
        decode: str = "argmax",
    ) -> None:
        self.name = name
        self.ttype = ttype
        self.vectorizer = vectorizer
        self.columns = columns
        self.prior = prior
        self.decode = decode

    @single_thread
    def probabilities(self, cases: Sequence[Case]) -> list[list[dict[Any, float]]]:
        """Per case, per label position: training label -> probability (bools on binary fields)."""
        if not cases:
            return []
        x = self.vectorizer.transform([case_text(c) for c in cases])
        per_col = [_column_probs(col, x) for col in self.columns]
        return [[per_col[j][i] for j in range(len(self.columns))] for i in range(len(cases))]

    def _value(self, probs: dict[Any, float]) -> Any:
        if self.ttype.kind is ValueKind.BINARY:
            return float(min(max(sum(p for lab, p in probs.items() if bool(lab)), 0.0), 1.0))
        if self.decode == "median":
            ordered = sorted(probs, key=lambda lab: _ordinal_key(lab) or 0.0)
            acc = 0.0
            for lab in ordered:
                acc += probs[lab]
                if acc >= 0.5:
                    return lab
            return ordered[-1]
        return max(probs, key=lambda lab: (probs[lab], str(lab)))

    @single_thread
    def predict(self, cases: Sequence[Case]) -> list[Any]:
        out = []
        for row in self.probabilities(cases):
            values = [self._value(p) for p in row]
            out.append(values if self.ttype.multi else values[0])
        return out


def _train_classification(train: Sequence[Case], ttype: TaskType, seed: int) -> list[Head]:
    labels = [c.label for c in train]
    width = len(labels[0]) if ttype.multi else 1
    columns_y = [[lab[j] for lab in labels] for j in range(width)] if ttype.multi else [labels]
    if all(len(set(map(str, y))) < 2 for y in columns_y):
        log.info("heads: every label position has a single class in training; no classification head")
        return []
    for j, y in enumerate(columns_y):
        if len(set(map(str, y))) < 2:
            log.info("heads: label position %d has a single training class %r; it gets that constant", j, y[0])
    prior = TrainingPrior(train, ttype)
    ordinal = ttype.kind is ValueKind.CLASS and all(_ordinal_key(v) is not None for y in columns_y for v in y)
    heads: list[Head] = []
    texts = [case_text(c) for c in train]
    for counts in (False, True):
        vectorizer = _vectorizer(counts)
        x = vectorizer.fit_transform(texts)
        for c in (1.0, 10.0):
            columns = [_fit_column(x, y, c=c, seed=seed) for y in columns_y]
            name = f"tfidf{'+counts' if counts else ''}-lr-C{c:g}"
            heads.append(ClassificationHead(name, ttype, vectorizer, columns, prior))
            if ordinal:
                heads.append(ClassificationHead(f"{name}-median", ttype, vectorizer, columns, prior, decode="median"))
    return heads


# ----- regression: which number is the answer -------------------------------------------------

NUMBER = re.compile(r"(?<![\d.,])\d+(?:[.,]\d+)?")
WORD = re.compile(r"[^\W\d_]+|\d+(?:[.,]\d+)?|[^\w\s]")
FACTORS = (1.0, 10.0, 0.1, 100.0, 0.01, 1000.0, 0.001)
NONE = "none"


@dataclass(frozen=True)
class Candidate:
    value: float  # as written, decimal comma read as a point
    start: int
    end: int
    index: int  # order among the report's numbers


def find_numbers(text: str) -> list[Candidate]:
    """Every number in the text; "3,5" and "3.5" both read 3.5."""
    out = []
    for i, m in enumerate(NUMBER.finditer(text)):
        out.append(Candidate(float(m.group().replace(",", ".")), m.start(), m.end(), i))
    return out


def _words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def _shape(word: str) -> str:
    s = re.sub(r"[A-Z]", "X", word)
    s = re.sub(r"[a-z]", "x", s)
    s = re.sub(r"\d", "d", s)
    return re.sub(r"(.)\1+", r"\1\1", s)


def _number_context(text: str, cand: Candidate) -> tuple[list[str], list[str]]:
    before = _words(text[max(0, cand.start - 120) : cand.start])[-6:]
    after = _words(text[cand.end : cand.end + 60])[:3]
    return before, after


def _number_features(text: str, cand: Candidate, rank: dict[str, int], n: int) -> list[str]:
    before, after = _number_context(text, cand)
    f = [f"b{len(before) - k}={w}" for k, w in enumerate(before)]
    f += [f"a{k + 1}={w}" for k, w in enumerate(after)]
    f += [f"bow={w}" for w in before]
    if len(before) >= 2:
        f.append(f"b21={before[-2]} {before[-1]}")
    if after:
        f.append(f"a1b1={before[-1] if before else ''} _ {after[0]}")
    glued = text[cand.end : cand.end + 1].isalpha()
    f.append(f"glued={glued}")
    f.append(f"prechar={text[cand.start - 1 : cand.start]}")
    f.append(f"decimal={cand.value != int(cand.value)}")
    f.append(f"index={min(cand.index, 10)}")
    f.append(f"last={cand.index == n - 1}")
    ctx = " ".join(before[-2:])
    f.append(f"rank_all={min(rank['all'], 5)}")
    f.append(f"rank_ctx={ctx}|{min(rank['ctx'], 5)}")
    f.append(f"magnitude={int(math.floor(math.log10(cand.value))) if cand.value > 0 else 'zero'}")
    return f


def _unit_of(text: str, cand: Candidate) -> str:
    _, after = _number_context(text, cand)
    return after[0] if after else ""


def _matches(value: float, target: float, *, rounded: bool) -> bool:
    if rounded:
        return round(value) == round(target) and abs(target - round(target)) < 1e-9
    return math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-9)


class NumberHead:
    """Per label position, a classifier over (number, unit factor) pairs; the most probable pair
    gives the answer, the training median when the report has no number."""

    def __init__(
        self,
        name: str,
        ttype: TaskType,
        vectorizer: CountVectorizer,
        models: list[LogisticRegression | None],
        medians: list[float],
        unit_factor: dict[str, float],
        rounds: list[bool],
    ) -> None:
        self.name = name
        self.ttype = ttype
        self.vectorizer = vectorizer
        self.models = models
        self.medians = medians
        self.unit_factor = unit_factor
        self.rounds = rounds

    def _position_value(self, j: int, text: str, cands: list[Candidate], x: Any) -> float:
        model = self.models[j]
        if model is None or not cands:
            return self.medians[j]
        proba = model.predict_proba(x)
        classes = list(model.classes_)
        best, best_p = None, -1.0
        for i, cand in enumerate(cands):
            for k, cls in enumerate(classes):
                if cls == NONE:
                    continue
                if proba[i, k] > best_p:
                    best, best_p = cand.value * float(cls), proba[i, k]
        if best is None:
            return self.medians[j]
        return float(round(best)) if self.rounds[j] else float(best)

    @single_thread
    def predict(self, cases: Sequence[Case]) -> list[Any]:
        out = []
        for case in cases:
            text = case.content
            cands = find_numbers(text)
            x = self.vectorizer.transform(_candidate_features(text, cands, self.unit_factor)) if cands else None
            values = [self._position_value(j, text, cands, x) for j in range(len(self.models))]
            out.append(values if self.ttype.multi else values[0])
        return out


def _candidate_features(text: str, cands: list[Candidate], unit_factor: dict[str, float]) -> list[list[str]]:
    """Features per number; ranks use the value in the learned unit (cm -> x10 when training says so)."""
    scaled = [c.value * unit_factor.get(_unit_of(text, c), 1.0) for c in cands]
    ctxs = [" ".join(_number_context(text, c)[0][-2:]) for c in cands]
    feats = []
    for i, cand in enumerate(cands):
        rank = {
            "all": sum(s > scaled[i] for s in scaled),
            "ctx": sum(s > scaled[i] for s, ctx in zip(scaled, ctxs, strict=True) if ctx == ctxs[i]),
        }
        feats.append(_number_features(text, cand, rank, len(cands)))
    return feats


def _identity(features: list[str]) -> list[str]:
    return features


def _feature_vectorizer() -> CountVectorizer:
    """Binary indicators of feature strings, vocabulary bounded to the most frequent."""
    return CountVectorizer(analyzer=_identity, binary=True, max_features=SPARSE_FEATURES, dtype=np.float64)


def _train_regression(train: Sequence[Case], ttype: TaskType, seed: int) -> list[Head]:
    labels = [c.label if ttype.multi else [c.label] for c in train]
    width = len(labels[0])
    medians = []
    for j in range(width):
        present = [float(lab[j]) for lab in labels if lab[j] is not None]
        medians.append(float(statistics.median(present)) if present else 0.0)
    texts = [c.content for c in train]
    cands = [find_numbers(t) for t in texts]

    # the unit factor per following word, from numbers that match a label only through one factor
    votes: dict[str, Counter[float]] = defaultdict(Counter)
    for text, cs, lab in zip(texts, cands, labels, strict=True):
        for cand in cs:
            for target in lab:
                if target is None:
                    continue
                hits = [f for f in FACTORS if _matches(cand.value * f, float(target), rounded=False)]
                if len(hits) == 1:
                    votes[_unit_of(text, cand)][hits[0]] += 1
    unit_factor = {u: c.most_common(1)[0][0] for u, c in votes.items() if c.most_common(1)[0][1] >= 2}

    feats = [_candidate_features(t, cs, unit_factor) if cs else [] for t, cs in zip(texts, cands, strict=True)]
    vectorizer = _feature_vectorizer().fit([f for fs in feats for f in fs])
    models: list[LogisticRegression | None] = []
    rounds: list[bool] = []
    for j in range(width):
        rows: list[list[str]] = []
        ys: list[str] = []
        usable = exact_reports = rounded_reports = 0
        for cs, fs, lab in zip(cands, feats, labels, strict=True):
            target = lab[j]
            if target is None or not cs:
                continue
            target = float(target)
            classes = _label_candidates(cs, target, rounded=False)
            if any(c != NONE for c in classes):
                exact_reports += 1
            else:
                classes = _label_candidates(cs, target, rounded=True)
                if all(c == NONE for c in classes):
                    continue  # the answer is not written in the report: nothing to learn here
                rounded_reports += 1
            usable += 1
            rows += fs
            ys += classes
        if usable < MIN_RECORDS or len(set(ys)) < 2:
            log.info(
                "heads: regression position %d: %d training reports state the answer; the median is used", j, usable
            )
            models.append(None)
            rounds.append(False)
            continue
        model = LogisticRegression(C=1.0, max_iter=MAX_ITER, random_state=seed)
        model.fit(vectorizer.transform(rows), ys)
        models.append(model)
        rounds.append(rounded_reports > exact_reports)
    if all(m is None for m in models):
        log.info("heads: no regression position could be learned; no number head")
        return []
    return [NumberHead("which-number", ttype, vectorizer, models, medians, unit_factor, rounds)]


def _label_candidates(cands: list[Candidate], target: float, *, rounded: bool) -> list[str]:
    """Per number, the factor (as a string class) that turns it into the target, or "none"."""
    out = []
    for cand in cands:
        hit = next((f for f in FACTORS if _matches(cand.value * f, target, rounded=rounded)), None)
        out.append(NONE if hit is None else f"{hit:g}")
    return out


# ----- NER --------------------------------------------------------------------------------------


def _word_features(words: Sequence[str], i: int) -> list[str]:
    def w(k: int) -> str:
        j = i + k
        return words[j].lower() if 0 <= j < len(words) else ("<s>" if j < 0 else "</s>")

    word = words[i]
    low = word.lower()
    f = [
        f"w={low}",
        f"shape={_shape(word)}",
        f"p2={low[:2]}",
        f"p3={low[:3]}",
        f"s2={low[-2:]}",
        f"s3={low[-3:]}",
        f"len={min(len(word), 12)}",
        f"title={word[:1].isupper()}",
        f"digit={any(ch.isdigit() for ch in word)}",
    ]
    for k in (-3, -2, -1, 1, 2, 3):
        f.append(f"w{k}={w(k)}")
        j = i + k
        f.append(f"shape{k}={_shape(words[j]) if 0 <= j < len(words) else '-'}")
    f.append(f"w-1w={w(-1)}|{low}")
    f.append(f"ww+1={low}|{w(1)}")
    return f


def _split(tag: str) -> tuple[str, str]:
    """("B", "lesion") from "B-lesion"; ("O", "") for "O" or an unprefixed tag."""
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
        return tag[0], tag[2:]
    return "O", ""


def repair_bio(tags: Sequence[str]) -> list[str]:
    """An I- tag that does not continue an entity of its type starts one (B-)."""
    out: list[str] = []
    prev = ""
    for tag in tags:
        prefix, kind = _split(tag)
        if prefix == "I" and prev != kind:
            tag = f"B-{kind}"
        out.append(tag)
        prev = kind if prefix != "O" else ""
    return out


NUMBERED = re.compile(r"^(\d+)-(.+)$")


def _unnumbered(kind: str) -> str:
    m = NUMBERED.match(kind)
    return m.group(2) if m else kind


def _base_tag(word_tags: Sequence[str]) -> str:
    """A word's multi-label tags without item numbers, as one class: "B-lesion", "B-x|I-y", "O"."""
    base = sorted({f"{p}-{_unnumbered(k)}" for p, k in map(_split, word_tags) if p != "O"})
    return "|".join(base) if base else "O"


class MarkerTable:
    """Item numbers from the words before an entity (back to the previous entity of its type): a
    word (or its +/,-separated pieces) always followed by the same item numbers in training is a
    marker; an entity with no marker before it gets its type's most common items."""

    WINDOW = 8

    def __init__(self) -> None:
        self.table: dict[str, frozenset[int]] = {}
        self.pieces: dict[str, frozenset[int]] = {}
        self.default: dict[str, frozenset[int]] = {}

    @staticmethod
    def _pieces(word: str) -> list[str]:
        return [p for p in re.split(r"[+,/&]|\s", word.lower()) if p]

    def fit(self, examples: list[tuple[list[str], str, frozenset[int]]]) -> MarkerTable:
        """`examples`: (words before the entity, nearest first), base type, item numbers."""
        seen: dict[str, Counter[frozenset[int]]] = defaultdict(Counter)
        by_type: dict[str, Counter[frozenset[int]]] = defaultdict(Counter)
        for before, kind, items in examples:
            by_type[kind][items] += 1
            for word in before[: self.WINDOW]:
                seen[word.lower()][items] += 1
        for word, counts in seen.items():
            items, n = counts.most_common(1)[0]
            if n >= 2 and n / sum(counts.values()) >= 0.9:
                self.table[word] = items
        for word, items in self.table.items():
            if len(self._pieces(word)) == 1 and len(items) == 1:
                self.pieces[self._pieces(word)[0]] = items
        self.default = {k: c.most_common(1)[0][0] for k, c in by_type.items()}
        return self

    def items(self, before: Sequence[str], kind: str) -> frozenset[int]:
        for word in before[: self.WINDOW]:
            low = word.lower()
            if low in self.table:
                return self.table[low]
            pieces = self._pieces(low)
            if len(pieces) > 1 and all(p in self.pieces for p in pieces):
                return frozenset().union(*(self.pieces[p] for p in pieces))
        return self.default.get(kind, frozenset({0}))


def _entities(tags: Sequence[str]) -> list[tuple[int, int, str]]:
    """(start, end exclusive, type) of a repaired single-tag BIO sequence."""
    spans = []
    start, kind = None, ""
    for k, tag in enumerate([*tags, "O"]):
        prefix, t = _split(tag)
        if start is not None and (prefix != "I" or t != kind):
            spans.append((start, k, kind))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = k, t
    return spans


class NerHead:
    """Per-word logistic regression over hashed word features; BIO repaired; training tags only."""

    def __init__(
        self,
        name: str,
        ttype: TaskType,
        vectorizer: CountVectorizer,
        model: LogisticRegression,
        markers: MarkerTable | None,
        transitions: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.name = name
        self.ttype = ttype
        self.vectorizer = vectorizer
        self.model = model
        self.markers = markers
        self.transitions, self.start = transitions if transitions is not None else (None, None)

    def _base_tags(self, words: Sequence[str]) -> list[str]:
        if not words:
            return []
        x = self.vectorizer.transform([_word_features(words, i) for i in range(len(words))])
        logp = np.log(np.clip(self.model.predict_proba(x), 1e-12, 1.0))
        classes = [str(t) for t in self.model.classes_]
        if self.transitions is None:
            return [classes[k] for k in logp.argmax(axis=1)]
        return [classes[k] for k in viterbi(logp, self.transitions, self.start)]

    @single_thread
    def predict(self, cases: Sequence[Case]) -> list[Any]:
        out = []
        for case in cases:
            words = list(case.parts or ())
            base = self._base_tags(words)
            if not self.ttype.multi:
                out.append(repair_bio(base))
                continue
            out.append(self._numbered(words, base) if self.markers else repair_multi([t.split("|") for t in base]))
        return out

    def _numbered(self, words: list[str], base: list[str]) -> list[list[str]]:
        assert self.markers is not None
        per_word: list[list[str]] = [[] for _ in words]
        kinds = sorted({k for tag in base for part in tag.split("|") for k in [_split(part)[1]] if k})
        for kind in kinds:
            column = []
            for tag in base:
                hit = next((p for p in tag.split("|") if _split(p)[1] == kind), "O")
                column.append(hit)
            prev = -1
            for start, end, _ in _entities(repair_bio(column)):
                before = words[prev + 1 : start][::-1]  # back to the previous entity of this type
                prev = start
                for item in sorted(self.markers.items(before, kind)):
                    per_word[start].append(f"B-{item}-{kind}")
                    for k in range(start + 1, end):
                        per_word[k].append(f"I-{item}-{kind}")
        return [sorted(t) if t else ["O"] for t in per_word]


def _all_word_features(train: Sequence[Case]) -> Iterator[list[str]]:
    """Word features one word at a time, so that only the sparse matrix is ever held in memory."""
    for case in train:
        words = list(case.parts or ())
        for i in range(len(words)):
            yield _word_features(words, i)


def _train_ner(train: Sequence[Case], ttype: TaskType, seed: int) -> list[Head]:
    ys: list[str] = []
    examples: list[tuple[list[str], str, frozenset[int]]] = []
    for case in train:
        words = list(case.parts or ())
        ys += [_base_tag(t) if ttype.multi else str(t) for t in case.label[: len(words)]]
        if ttype.multi:
            examples += _item_examples(words, case.label)
    if len(set(ys)) < 2:
        log.info("heads: the training tags are all %r; no NER head", ys[0] if ys else "O")
        return []
    vectorizer = _feature_vectorizer()
    x = vectorizer.fit_transform(_all_word_features(train))
    model = LogisticRegression(C=1.0, max_iter=MAX_ITER, random_state=seed)
    model.fit(x, ys)
    markers = MarkerTable().fit(examples) if ttype.multi else None
    classes = [str(t) for t in model.classes_]
    sequences = [[_base_tag(t) if ttype.multi else str(t) for t in case.label] for case in train if case.parts]
    heads: list[Head] = [
        NerHead("word-lr", ttype, vectorizer, model, markers),
        NerHead("word-lr-viterbi", ttype, vectorizer, model, markers, tag_transitions(sequences, classes)),
    ]
    if ttype.multi:  # the alternative: learn the numbered tags themselves, word by word
        full = [_joined(t) for case in train for t in case.label[: len(case.parts or ())]]
        learned = LogisticRegression(C=1.0, max_iter=MAX_ITER, random_state=seed)
        learned.fit(x, full)
        heads.append(NerHead("word-lr-items-learned", ttype, vectorizer, learned, None))
    return heads


def _joined(word_tags: Sequence[str]) -> str:
    tags = sorted({t for t in word_tags if t != "O"})
    return "|".join(tags) if tags else "O"


def repair_multi(per_word: Sequence[Sequence[str]]) -> list[list[str]]:
    """BIO repair per tag type on multi-label tags; a word without tags gets ["O"]."""
    out: list[list[str]] = []
    prev: set[str] = set()
    for tags in per_word:
        fixed = set()
        for tag in tags:
            prefix, kind = _split(tag)
            if prefix == "O":
                continue
            fixed.add(f"B-{kind}" if prefix == "I" and kind not in prev else tag)
        prev = {_split(t)[1] for t in fixed}
        out.append(sorted(fixed) if fixed else ["O"])
    return out


def tag_transitions(sequences: Sequence[Sequence[str]], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of tag bigrams (and first tags) in training, lightly smoothed."""
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    counts = np.full((k, k), 0.1)
    first = np.full(k, 0.1)
    for seq in sequences:
        ids = [index[t] for t in seq if t in index]
        if ids:
            first[ids[0]] += 1
        for a, b in zip(ids, ids[1:], strict=False):
            counts[a, b] += 1
    return np.log(counts / counts.sum(axis=1, keepdims=True)), np.log(first / first.sum())


def viterbi(logp: np.ndarray, trans: np.ndarray, start: np.ndarray) -> list[int]:
    """The tag sequence maximising per-word log-probabilities plus tag-bigram log-probabilities."""
    n, k = logp.shape
    score = start + logp[0]
    back = np.zeros((n, k), dtype=np.int64)
    for i in range(1, n):
        cand = score[:, None] + trans
        back[i] = cand.argmax(axis=0)
        score = cand[back[i], np.arange(k)] + logp[i]
    path = [int(score.argmax())]
    for i in range(n - 1, 0, -1):
        path.append(int(back[i, path[-1]]))
    return path[::-1]


def _item_examples(words: list[str], labels: Sequence[Sequence[str]]) -> list[tuple[list[str], str, frozenset[int]]]:
    """Each numbered entity start: the words back to the previous entity of its type (nearest
    first), its base type and its item numbers."""
    starts: dict[tuple[int, str], set[int]] = defaultdict(set)
    for i, word_tags in enumerate(labels):
        for tag in word_tags:
            prefix, kind = _split(tag)
            m = NUMBERED.match(kind)
            if prefix == "B" and m:
                starts[(i, m.group(2))].add(int(m.group(1)))
    out = []
    prev: dict[str, int] = {}
    for (i, kind), items in sorted(starts.items()):
        out.append((words[prev.get(kind, -1) + 1 : i][::-1], kind, frozenset(items)))
        prev[kind] = i
    return out


# ----- entry points -----------------------------------------------------------------------------


def usable_records(train: Sequence[Case], ttype: TaskType) -> int:
    """Training records a head can learn from (a regression record with every value null cannot)."""
    if ttype.kind is ValueKind.NUMBER:
        return sum(any(v is not None for v in (c.label if ttype.multi else [c.label])) for c in train)
    return sum(c.label is not None and not c.is_blank for c in train)


@single_thread
def train_heads(train: Sequence[Case], ttype: TaskType, *, seed: int = 0) -> list[Head]:
    """Every lexical head the training set supports (possibly none: then the caller uses the prior)."""
    n = usable_records(train, ttype)
    if n < MIN_RECORDS:
        log.info("heads: %d usable training records (< %d); no head is trained, the prior answers", n, MIN_RECORDS)
        return []
    if ttype.is_ner:
        return _train_ner(train, ttype, seed)
    if ttype.kind is ValueKind.NUMBER:
        return _train_regression(train, ttype, seed)
    return _train_classification(train, ttype, seed)


class EmbeddingHead:
    """A linear head on report vectors from a callable (the engine's pooled embeddings):
    logistic regression per label position for classification, ridge regression for numbers.

    Vectors are L2-normalised, then standardised with the training vectors' mean and spread: a
    causal LM's mean-pooled hidden states share a few dominant dimensions, and standardising
    lets every dimension count for the regularised linear model."""

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray], name: str = "embedding-linear") -> None:
        self.embed = embed
        self.name = name
        self.ttype: TaskType | None = None
        self.columns: list[Any] = []
        self.prior: TrainingPrior | None = None
        self.center: np.ndarray | float = 0.0
        self.scale: np.ndarray | float = 1.0

    def _x(self, cases: Sequence[Case], *, fit: bool = False) -> np.ndarray:
        x = np.asarray(self.embed([c.content for c in cases]), dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != len(cases):
            raise ValueError(f"embed returned shape {x.shape} for {len(cases)} texts; expected (n, dim)")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1.0)
        if fit:
            sd = x.std(axis=0)
            self.center, self.scale = x.mean(axis=0), np.where(sd > 1e-9, sd, 1.0)
        return (x - self.center) / self.scale

    @single_thread
    def fit(self, train: Sequence[Case], ttype: TaskType, *, seed: int = 0) -> EmbeddingHead | None:
        """Train on the training set; None (with a log line) when it is too small or one-class."""
        if ttype.is_ner:
            raise ValueError("the embedding head is for classification and regression, not NER")
        n = usable_records(train, ttype)
        if n < MIN_RECORDS:
            log.info("heads: %d usable training records (< %d); no embedding head", n, MIN_RECORDS)
            return None
        self.ttype, self.prior = ttype, TrainingPrior(train, ttype)
        x = self._x(train, fit=True)
        labels = [c.label if ttype.multi else [c.label] for c in train]
        self.columns = []
        for j in range(len(labels[0])):
            y = [lab[j] for lab in labels]
            if ttype.kind is ValueKind.NUMBER:
                keep = [i for i, v in enumerate(y) if v is not None]
                if len(keep) < MIN_RECORDS:
                    self.columns.append(None)
                    continue
                self.columns.append(Ridge(alpha=1.0).fit(x[keep], [float(y[i]) for i in keep]))
            else:
                self.columns.append(_fit_column(x, y, c=1.0, seed=seed))
        if ttype.kind is not ValueKind.NUMBER and all(col.model is None for col in self.columns):
            log.info("heads: every label position has a single class; no embedding head")
            return None
        if ttype.kind is ValueKind.NUMBER and all(col is None for col in self.columns):
            log.info("heads: no regression position has %d values; no embedding head", MIN_RECORDS)
            return None
        return self

    @single_thread
    def probabilities(self, cases: Sequence[Case]) -> list[list[dict[Any, float]]]:
        assert self.ttype is not None and self.ttype.kind is not ValueKind.NUMBER
        if not cases:
            return []
        x = self._x(cases)
        per_col = [_column_probs(col, x) for col in self.columns]
        return [[per_col[j][i] for j in range(len(self.columns))] for i in range(len(cases))]

    @single_thread
    def predict(self, cases: Sequence[Case]) -> list[Any]:
        assert self.ttype is not None and self.prior is not None
        ttype = self.ttype
        if not cases:
            return []
        if ttype.kind is ValueKind.NUMBER:
            x = self._x(cases)
            prior = self.prior.value if ttype.multi else [self.prior.value]
            cols = [
                col.predict(x).astype(float).tolist() if col is not None else [float(prior[j])] * len(cases)
                for j, col in enumerate(self.columns)
            ]
            rows = [[float(cols[j][i]) for j in range(len(cols))] for i in range(len(cases))]
            return rows if ttype.multi else [r[0] for r in rows]
        head = ClassificationHead(self.name, ttype, None, self.columns, self.prior)
        out = []
        for row in self.probabilities(cases):
            values = [head._value(p) for p in row]
            out.append(values if ttype.multi else values[0])
        return out
