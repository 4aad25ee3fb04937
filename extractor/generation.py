"""Generation with retries: every case ends with a validated answer or is counted as a failure.

Each retry changes what can change the outcome: attempt 2 doubles the token budget (a JSON
answer cut off at the budget is the usual failure), attempt 3 also drops the reasoning field.
Backend-agnostic: the same loop drives the llama.cpp engine, the oracle and test backends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extractor.backend import Generator, Request, Result, StopRequested, check_stop
from extractor.dragon_io import Case
from extractor.prompts import PromptBuilder
from extractor.schema import AnswerError, parse_answer
from extractor.taskfiles import Taskfile

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
PLATFORM_DEFAULT_LIMIT_S = 20 * 60  # Grand Challenge's default job time limit


@dataclass(frozen=True)
class Attempt:
    reasoning: bool
    budget_factor: int


def attempt_plan(tf: Taskfile) -> tuple[Attempt, ...]:
    """What each of the three attempts changes."""
    reasoning = tf.reasoning.enabled
    return (Attempt(reasoning, 1), Attempt(reasoning, 2), Attempt(False, 2))


@dataclass
class CaseAnswer:
    uid: str
    answer: dict[str, Any] | None = None
    likelihoods: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    attempts: int = 0
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    truncated: bool = False
    level: int = 0  # the LEVELS index it was made at: above 0, the time budget cut something

    @property
    def ok(self) -> bool:
        return self.answer is not None

    @property
    def full_quality(self) -> bool:
        """Answered as configured: the only kind a rerun with more time may reuse."""
        return self.ok and self.level == 0


@dataclass
class GenerationStats:
    cases: int = 0
    blank: int = 0
    answered: int = 0
    retries: int = 0
    failures: int = 0
    truncated: int = 0
    examples: int = 0  # solved examples shown, summed over first attempts
    prompt_tokens: int = 0
    output_tokens: int = 0
    resumed: int = 0
    interrupted: bool = False
    degraded: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


def _classify(message: str) -> str:
    return message.split(":", 1)[0][:60]


# What each degradation level gives up to fit the time budget, cheapest loss first.
LEVELS = ("as configured", "no reasoning", "no reasoning, no examples, one attempt", "fallback (no time left)")


@dataclass
class TimeBudget:
    """Fits the remaining reports into the time left by degrading in steps (see LEVELS).

    After each chunk the measured seconds per report at the current level decide: when the rest
    would not fit, the next chunk runs one level cheaper; at the cheapest model level, reports that
    cannot fit get the fallback answer.
    """

    deadline: float | None = None
    reserve_s: float = 20.0
    clock: Callable[[], float] = time.monotonic
    level: int = 0
    started: float | None = None  # when the job started, for the projection without a deadline
    projected: bool = False

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock() - self.reserve_s

    def project(self, remaining: int, seconds_per_case: float) -> None:
        """Once, after the first measured chunk: the projected end at the current rate, with a
        warning when it passes the time limit, or the platform's default of 20 minutes when none
        is set (the platform does not tell the container its limit)."""
        if self.projected:
            return
        self.projected = True
        now = self.clock()
        rest = remaining * seconds_per_case
        log.info("projected: %.0f s more for %d reports at %.2f s a report", rest, remaining, seconds_per_case)
        if self.deadline is not None:
            if now + rest > self.deadline:
                log.warning(
                    "projected end passes --time-limit by %.0f s: the budget will degrade answers",
                    now + rest - self.deadline,
                )
        elif self.started is not None and now + rest - self.started > PLATFORM_DEFAULT_LIMIT_S:
            log.warning(
                "projected total %.0f s passes the platform's default limit of %d s; set --time-limit "
                "(DRAGON_TIME_LIMIT) to the algorithm's limit so the job degrades to finish in time",
                now + rest - self.started,
                PLATFORM_DEFAULT_LIMIT_S,
            )

    def next_level(self, remaining: int, seconds_per_case: float | None, chunk: int) -> int:
        if seconds_per_case is not None and remaining:
            self.project(remaining, seconds_per_case)
        if self.deadline is None or seconds_per_case is None:
            return self.level
        left = self.deadline - self.clock() - self.reserve_s
        if self.level < 2 and seconds_per_case * remaining > left:
            self.level += 1
            log.warning("time budget: %.0f s left for %d reports; switching to %s", left, remaining, LEVELS[self.level])
        elif self.level == 2 and seconds_per_case * min(chunk, remaining) > left:
            self.level = 3
            log.warning("time budget: %.0f s left; the remaining %d reports get the fallback", left, remaining)
        return self.level


def answer_cases(
    cases: Sequence[Case],
    builder: PromptBuilder,
    backend: Generator,
    *,
    on_result: Callable[[CaseAnswer], None] | None = None,
    budget: TimeBudget | None = None,
    done: Mapping[str, CaseAnswer] | None = None,
    chunk_size: int = 32,
) -> tuple[dict[str, CaseAnswer], GenerationStats]:
    """Ask the backend about every non-blank case, in chunks, retrying failures up to three
    attempts in all. `done` holds answers from an earlier run (the journal); `budget` degrades
    the work to end in time; a StopRequested (signal) ends early with what is answered."""
    budget = budget or TimeBudget()
    stats = GenerationStats(cases=len(cases))
    answers: dict[str, CaseAnswer] = {}
    todo: list[Case] = []
    for case in cases:
        if case.is_blank:
            stats.blank += 1
            answers[case.uid] = CaseAnswer(uid=case.uid, error="blank report")
        elif done and case.uid in done:
            answers[case.uid] = done[case.uid]
            stats.resumed += 1
            stats.answered += done[case.uid].ok
            stats.failures += not done[case.uid].ok
        else:
            todo.append(case)
    seconds_per_case: float | None = None
    start = 0
    try:
        while start < len(todo):
            size = min(chunk_size, 4) if seconds_per_case is None else chunk_size
            level = budget.next_level(len(todo) - start, seconds_per_case, size)
            chunk = todo[start : start + size]
            if level >= 3:
                for case in todo[start:]:
                    stats.degraded[LEVELS[3]] = stats.degraded.get(LEVELS[3], 0) + 1
                    answers[case.uid] = CaseAnswer(uid=case.uid, error="time budget")
                break
            if level > 0:
                stats.degraded[LEVELS[level]] = stats.degraded.get(LEVELS[level], 0) + len(chunk)
            check_stop()
            t0 = budget.clock()
            _answer_chunk(chunk, builder, backend, level, answers, stats, on_result)
            seconds_per_case = (budget.clock() - t0) / max(len(chunk), 1)
            start += len(chunk)
    except StopRequested:
        stats.interrupted = True
        log.warning("stopped by a signal: %d of %d reports answered", stats.answered, len(cases))
    return answers, stats


def _answer_chunk(
    chunk: Sequence[Case],
    builder: PromptBuilder,
    backend: Generator,
    level: int,
    answers: dict[str, CaseAnswer],
    stats: GenerationStats,
    on_result: Callable[[CaseAnswer], None] | None,
) -> None:
    tf = builder.tf
    plan = attempt_plan(tf)
    if level >= 1:
        plan = tuple(Attempt(False, a.budget_factor) for a in plan)
    if level >= 2:
        plan = plan[:1]
    by_uid = {c.uid: c for c in chunk}
    pending = list(chunk)
    engine_failed: set[str] = set()
    given_up: list[Case] = []
    rescore: list[Case] = []  # answered after a reasoning: scored again without it (Taskfile option)
    previous: Attempt | None = None
    for number, attempt in enumerate(plan, start=1):
        if attempt == previous:
            # Greedy decoding repeats itself: the same request again only helps after an engine error.
            given_up += [c for c in pending if c.uid not in engine_failed]
            pending = [c for c in pending if c.uid in engine_failed]
        previous = attempt
        if not pending:
            break
        if number > 1:
            stats.retries += len(pending)
            log.info(
                "attempt %d for %d cases (reasoning %s, budget x%d)",
                number,
                len(pending),
                attempt.reasoning,
                attempt.budget_factor,
            )
        requests = []
        for case in pending:
            p = builder.build(
                case,
                reasoning=attempt.reasoning,
                max_tokens=tf.max_output_tokens * attempt.budget_factor,
                attempt=number,
                use_examples=level < 2,
            )
            requests.append(p.request)
            if number == 1:
                stats.truncated += p.truncated
                stats.examples += p.examples
        schemas = {r.uid: r.schema for r in requests}
        failed: list[Case] = []
        engine_failed.clear()
        for result in _generate(backend, requests):
            check_stop()
            case = by_uid[result.uid]
            entry = answers.setdefault(result.uid, CaseAnswer(uid=result.uid))
            entry.attempts, entry.level = number, level
            entry.prompt_tokens += result.prompt_tokens
            entry.output_tokens += result.output_tokens
            stats.prompt_tokens += result.prompt_tokens
            stats.output_tokens += result.output_tokens
            try:
                if result.error:
                    engine_failed.add(result.uid)
                    raise AnswerError(result.error)
                if not result.finished:
                    raise AnswerError(f"token budget exhausted after {result.output_tokens} tokens")
                entry.answer = parse_answer(result.text, schemas[result.uid])
                entry.likelihoods = result.likelihoods
                entry.error = None
                stats.answered += 1
                if attempt.reasoning and tf.reasoning.scores == "without_reasoning":
                    rescore.append(case)
                elif on_result:
                    on_result(entry)
            except AnswerError as err:
                entry.error = str(err)
                stats.errors[_classify(str(err))] = stats.errors.get(_classify(str(err)), 0) + 1
                log.debug("uid %s attempt %d failed: %s", result.uid, number, err)
                failed.append(case)
        pending = failed
    if rescore:
        _score_without_reasoning(rescore, builder, backend, answers, stats, use_examples=level < 2)
        for case in rescore:
            if on_result:
                on_result(answers[case.uid])
    for case in given_up + pending:
        stats.failures += 1
        if on_result:
            on_result(answers[case.uid])


def _score_without_reasoning(
    cases: Sequence[Case],
    builder: PromptBuilder,
    backend: Generator,
    answers: dict[str, CaseAnswer],
    stats: GenerationStats,
    *,
    use_examples: bool,
) -> None:
    """The label likelihoods of the same prompt with the reasoning omitted: after a chain of
    thought they sit near 0 or 1, which leaves AUROC with ties. Only the yes/no fields' scores (the
    probabilities) come from here; label fields keep their reasoned answer. A failed rescoring
    keeps the reasoned scores."""
    tf = builder.tf
    requests = [
        builder.build(c, reasoning=False, max_tokens=tf.max_output_tokens, attempt=1, use_examples=use_examples).request
        for c in cases
    ]
    for result in _generate(backend, requests):
        check_stop()
        entry = answers[result.uid]
        entry.prompt_tokens += result.prompt_tokens
        entry.output_tokens += result.output_tokens
        stats.prompt_tokens += result.prompt_tokens
        stats.output_tokens += result.output_tokens
        if result.error or not result.finished or not result.likelihoods:
            log.debug("uid %s: no scores without reasoning (%s); keeping the reasoned ones", result.uid, result.error)
            continue
        ranked = {f.name for f in tf.fields if f.type == "boolean"}
        entry.likelihoods = {**entry.likelihoods, **{k: v for k, v in result.likelihoods.items() if k in ranked}}


def _generate(backend: Generator, requests: Iterable[Request]):
    """Run the backend; a crash inside it fails the whole batch as errors rather than the job."""
    requests = list(requests)
    seen: set[str] = set()
    try:
        for result in backend.generate(requests):
            seen.add(result.uid)
            yield result
    except Exception as err:  # noqa: BLE001 - one bad batch never kills a job
        log.exception("backend %s failed", backend.name)
        for req in requests:
            if req.uid not in seen:
                yield Result(uid=req.uid, text="", error=f"backend error: {err}")
