"""Choosing per job what answers the test set: the LLM, a trained head, the vote, or a blend.

Every candidate is scored on the job's validation set with DRAGON's own metric for the task
(`extractor.metrics.task_score`). The validation set only chooses; no candidate learns from it.

Two rounds, because the model is costly and the heads are not:
1. every model-free candidate (the heads, the neighbour vote, the training prior) predicts every
   validation case; the best becomes the *base*: the answer for every case the model does not
   answer (failures, the time budget, a model that loses);
2. the model answers the first N validation cases; the model alone and its blends with the
   base are compared with the base on those same N cases. The model answers the test set only if
   one of them beats the base.
A tie on the metric (to DECIMALS) goes to the candidate whose answers agree with more of the labels
(`agreement`; probabilities on AUROC fields do not count): a sample on which the metric cannot
separate the candidates, such as kappa on a validation sample of one class (0 for every
candidate), still says who answered more of it right.
Past that, ties in round 1 go to the more specific candidate (heads, then the vote, then the
prior); in round 2 the model alone wins a tie with the base (the base must beat it outright), and a
blend must beat the base outright (tied, it is the base at the model's cost).

On multi-label tasks each round also tries a per-field mix: from the round's winner, each label
position is taken from another candidate (round 2: the model or the base) when that raises the
task's score outright, one position at a time; the mix is taken only when it beats the winner by
MIX_MIN_GAIN (a mix is fitted on the validation set; a tiny gain is noise). DRAGON pools most
multi-label metrics over the positions, so positions are not scored apart: every mix is scored
whole, with the exact metric.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from extractor.dragon_io import Case
from extractor.tasktypes import TaskType, ValueKind

log = logging.getLogger(__name__)

DECIMALS = 6  # scores equal to 6 decimals are a tie: float noise must not decide
BLEND_WEIGHTS = (0.25, 0.5, 0.75)  # weight of the base's probabilities in a blend with the model
# A per-field mix is fitted position by position on the validation set, so a tiny gain is noise: on
# Task104 a mix that won by 0.0001 on validation lost 0.0008 on the test set. It must win by this.
MIX_MIN_GAIN = 0.005


@dataclass(frozen=True)
class Candidate:
    """A way to answer cases without the model: `predict` gives DRAGON values for cases, `shares`
    (classification only) each position's label probabilities, which a blend mixes in."""

    name: str
    predict: Callable[[Sequence[Case]], list[Any]]
    shares: Callable[[Sequence[Case]], list[list[dict[Any, float]]]] | None = None
    cost: int = 0  # tie-breaker: lower wins


@dataclass(frozen=True)
class Scored:
    name: str
    score: float | None  # None: the candidate failed on these cases
    cases: int
    error: str | None = None
    agreement: float = 0.0  # share of label positions answered right: the tie-breaker after the score


@dataclass
class Choice:
    """What a round chose, every candidate's score, and by how much the winner won. A per-field
    mix that won names each position's source in `sources` (round 1: its candidate in `mixed`)."""

    chosen: str
    scores: list[Scored] = field(default_factory=list)
    sources: tuple[str, ...] = ()
    mixed: Candidate | None = None

    @property
    def margin(self) -> float:
        valid = sorted((s.score for s in self.scores if s.score is not None), reverse=True)
        return valid[0] - valid[1] if len(valid) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "margin": round(self.margin, DECIMALS),
            "scores": {s.name: None if s.score is None else round(s.score, DECIMALS) for s in self.scores},
            **({"sources": list(self.sources)} if self.sources else {}),
            "cases": {s.name: s.cases for s in self.scores},
            **(
                {"errors": {s.name: s.error for s in self.scores if s.error}}
                if any(s.error for s in self.scores)
                else {}
            ),
        }


def agreement(truths: Sequence[Any], values: Sequence[Any]) -> float:
    """The share of label positions answered exactly (lists compared position by position, NER tags
    tag by tag). A probability against a 0/1 label does not count: AUC judges it by its rank, which
    the metric has already scored, and a cut at 0.5 would break a tie of two perfect rankings at
    random."""
    counts = [0, 0]  # right, positions

    def walk(truth: Any, value: Any) -> None:
        if isinstance(truth, list | tuple) and isinstance(value, list | tuple) and len(truth) == len(value):
            for t, v in zip(truth, value, strict=True):
                walk(t, v)
            return
        if _is_probability(truth, value):
            return
        counts[1] += 1
        counts[0] += bool(truth == value)

    walk(list(truths), list(values))
    return counts[0] / counts[1] if counts[1] else 0.0


def _is_probability(truth: Any, value: Any) -> bool:
    return isinstance(value, float) and isinstance(truth, bool | int) and truth in (0, 1) and 0.0 <= value <= 1.0


def score_candidates(
    predictions: Mapping[str, Callable[[], list[Any]]],
    truths: Sequence[Any],
    metric: Callable[[Sequence[Any], Sequence[Any]], float],
    values_out: dict[str, list[Any]] | None = None,
) -> list[Scored]:
    """Each candidate's metric on the same cases; a candidate that raises is scored None, not fatal.
    The answers of the candidates that scored go into `values_out` when given."""
    scored = []
    for name, predict in predictions.items():
        try:
            values = predict()
            if len(values) != len(truths):
                raise ValueError(f"{len(values)} predictions for {len(truths)} cases")
            scored.append(Scored(name, float(metric(truths, values)), len(truths), agreement=agreement(truths, values)))
            if values_out is not None:
                values_out[name] = values
        except Exception as err:  # noqa: BLE001 - one broken candidate must not end the job
            log.warning("candidate %s failed on validation: %s", name, err)
            scored.append(Scored(name, None, len(truths), error=str(err)[:200]))
    return scored


def mix_per_field(
    values: Mapping[str, Sequence[Sequence[Any]]],
    start: str,
    truths: Sequence[Any],
    metric: Callable[[Sequence[Any], Sequence[Any]], float],
) -> tuple[tuple[str, ...], float]:
    """Greedy per-field mix of multi-label answers: from `start`'s answers, position by position,
    take the position from the first other source whose answers raise the score outright (to
    DECIMALS). Returns each position's source and the mix's score; where nothing helps, every
    position is `start`'s."""

    def answers(sources: Sequence[str]) -> list[list[Any]]:
        return [[values[src][i][j] for j, src in enumerate(sources)] for i in range(len(truths))]

    width = len(values[start][0]) if truths else 0
    sources = [start] * width
    best = round(float(metric(truths, answers(sources))), DECIMALS)
    for j in range(width):
        for name in values:
            if name == sources[j]:
                continue
            trial = [*sources[:j], name, *sources[j + 1 :]]
            try:
                score = round(float(metric(truths, answers(trial))), DECIMALS)
            except Exception as err:  # noqa: BLE001 - a mix the metric rejects is just not taken
                log.debug("per-field mix %s not scored: %s", trial, err)
                continue
            if score > best:
                sources, best = trial, score
    return tuple(sources), best


def mixed_candidate(sources: Sequence[Candidate]) -> Candidate:
    """One candidate answering each label position with that position's source; it has shares
    (for blends) only when every source has them."""
    names = [c.name for c in sources]
    distinct = {c.name: c for c in sources}

    def columns(get: Callable[[Candidate], list[Any]]) -> list[list[Any]]:
        by_name = {name: get(c) for name, c in distinct.items()}
        n = len(next(iter(by_name.values())))
        return [[by_name[name][i][j] for j, name in enumerate(names)] for i in range(n)]

    def predict(cases: Sequence[Case]) -> list[Any]:
        return columns(lambda c: c.predict(cases))

    def shares(cases: Sequence[Case]) -> list[list[dict[Any, float]]]:
        return columns(lambda c: c.shares(cases))  # type: ignore[misc]

    blendable = all(c.shares is not None for c in distinct.values())
    return Candidate(f"per-field[{','.join(names)}]", predict, shares if blendable else None)


def pick(scored: Sequence[Scored], cost: Mapping[str, int]) -> Choice:
    """The best score; ties (to DECIMALS) go to the higher agreement with the labels, then to the
    lower cost, then to the earlier candidate. With no valid score at all, the first candidate (the
    cheapest fallback) is chosen."""
    order = {s.name: i for i, s in enumerate(scored)}
    valid = [s for s in scored if s.score is not None]
    if not valid:
        return Choice(scored[0].name if scored else "", list(scored))

    def rank(s: Scored) -> tuple[float, float, int, int]:
        return round(s.score or 0.0, DECIMALS), round(s.agreement, DECIMALS), -cost.get(s.name, 0), -order[s.name]

    best = max(valid, key=rank)
    tied = [s for s in valid if s is not best and rank(s)[0] == rank(best)[0]]
    if any(rank(s)[1] < rank(best)[1] for s in tied):
        log.info(
            "%d candidates tie at %.3f: %s agrees with more labels (%.3f; %s)",
            len(tied) + 1,
            best.score or 0.0,
            best.name,
            best.agreement,
            ", ".join(f"{s.name} {s.agreement:.3f}" for s in tied),
        )
    return Choice(best.name, list(scored))


def choose_base(
    candidates: Sequence[Candidate], validation: Sequence[Case], metric, *, per_field: bool = False
) -> Choice:
    """Round 1: the best model-free candidate on every validation case (with `per_field`, on a
    multi-label task, possibly a per-field mix of them). Without validation cases (or labels)
    there is nothing to compare: the first candidate (the most specific head) wins."""
    if not candidates:
        raise ValueError("no model-free candidate: the training prior should always be one")
    if not validation:
        log.warning("no validation cases: cannot compare candidates; using %s", candidates[0].name)
        return Choice(candidates[0].name, [Scored(c.name, None, 0) for c in candidates])
    truths = [c.label for c in validation]
    values: dict[str, list[Any]] = {}
    scored = score_candidates({c.name: (lambda c=c: c.predict(validation)) for c in candidates}, truths, metric, values)
    choice = pick(scored, {c.name: c.cost for c in candidates})
    if per_field and len(values) > 1 and choice.chosen in values:
        sources, score = mix_per_field(values, choice.chosen, truths, metric)
        start = next(x.score for x in choice.scores if x.name == choice.chosen) or 0.0
        if len(set(sources)) > 1 and score >= round(start, DECIMALS) + MIX_MIN_GAIN:
            by_name = {c.name: c for c in candidates}
            mixed = mixed_candidate([by_name[s] for s in sources])
            choice.scores.append(Scored(mixed.name, score, len(truths)))
            choice.chosen, choice.sources, choice.mixed = mixed.name, sources, mixed
    log.info(
        "validation (%d cases), model-free candidates: %s; base: %s (by %.3f)",
        len(validation),
        _fmt(choice.scores),
        choice.chosen,
        choice.margin,
    )
    return choice


def _fmt(scores: Sequence[Scored]) -> str:
    return ", ".join(f"{s.name} {'failed' if s.score is None else f'{s.score:.3f}'}" for s in scores)


def choose_with_model(
    base: Candidate,
    model_variants: Mapping[str, Callable[[Sequence[Case]], list[Any]]],
    sample: Sequence[Case],
    metric,
    *,
    blends: Collection[str] = (),
    per_field: bool = False,
) -> Choice:
    """Round 2: the base against the model's variants (the model alone, blends, example
    strategies), all on the same validation sample; variants listed cheapest first. The model
    alone wins a tie with the base; a blend (named in `blends`) must beat the base outright, as a
    blend that only ties it is the base at the model's cost. With `per_field` (multi-label tasks)
    the best model variant and the base are also mixed per field; a mix that wins outright is
    chosen as `"<variant>|<base> per field"`, its `sources` naming each position's side."""
    truths = [c.label for c in sample]
    predictions: dict[str, Callable[[], list[Any]]] = {base.name: lambda: base.predict(sample)}
    for name, predict in model_variants.items():
        predictions[name] = lambda predict=predict: predict(sample)
    values: dict[str, list[Any]] = {}
    scored = score_candidates(predictions, truths, metric, values)
    alone = [name for name in model_variants if name not in blends]
    order = [*alone, base.name, *(name for name in model_variants if name in blends)]
    cost = {name: i for i, name in enumerate(order)}
    choice = pick(scored, cost)
    model_scored = [s for s in scored if s.name in model_variants and s.score is not None]
    if per_field and model_scored and base.name in values and sample:
        best_model = pick(model_scored, cost).chosen
        pair = {best_model: values[best_model], base.name: values[base.name]}
        start = choice.chosen if choice.chosen in pair else best_model
        sources, score = mix_per_field(pair, start, truths, metric)
        top = max(round(s.score, DECIMALS) for s in scored if s.score is not None)
        if len(set(sources)) > 1 and score >= top + MIX_MIN_GAIN:
            name = f"{best_model}|{base.name} per field"
            choice.scores.append(Scored(name, score, len(truths)))
            choice.chosen, choice.sources = name, sources
    log.info(
        "validation (%d cases), with the model: %s; using %s (by %.3f)",
        len(sample),
        _fmt(choice.scores),
        choice.chosen,
        choice.margin,
    )
    return choice


@runtime_checkable
class WithProbabilities(Protocol):
    """A head that also gives each position's label probabilities (classification heads)."""

    name: str

    def predict(self, cases: Sequence[Case]) -> list[Any]: ...

    def probabilities(self, cases: Sequence[Case]) -> list[list[dict[Any, float]]]: ...


def head_candidate(head: Any) -> Candidate:
    """A trained head as a candidate; its probabilities, where it has them, are what blends mix in."""
    shares = head.probabilities if isinstance(head, WithProbabilities) else None
    return Candidate(head.name, head.predict, shares)


def fallback_candidate(fallback: Any, ttype: TaskType) -> Candidate:
    """The vote or the prior as a candidate (case by case); shares only where labels are scored."""
    blendable = ttype.kind in (ValueKind.BINARY, ValueKind.CLASS)

    def shares(cases: Sequence[Case]) -> list[Any]:
        return [fallback.shares(c) for c in cases]

    has_shares = blendable and fallback.name != "prior"
    return Candidate(fallback.name, lambda cases: [fallback(c) for c in cases], shares if has_shares else None)


class Precomputed:
    """A candidate's answers for a fixed set of cases, as the pipeline's Fallback: computed once,
    in one vectorised call, then looked up case by case."""

    def __init__(self, candidate: Candidate, cases: Sequence[Case]) -> None:
        self.name = candidate.name
        values = candidate.predict(cases) if cases else []
        shares = candidate.shares(cases) if candidate.shares and cases else None
        self._values = {c.uid: v for c, v in zip(cases, values, strict=True)}
        self._shares = {c.uid: s for c, s in zip(cases, shares, strict=True)} if shares is not None else None

    def __call__(self, case: Case) -> Any:
        return self._values[case.uid]

    def shares(self, case: Case) -> list[dict[Any, float]] | None:
        return None if self._shares is None else self._shares[case.uid]

    @property
    def blendable(self) -> bool:
        return self._shares is not None
