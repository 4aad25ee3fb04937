"""Generation with retries: every case ends with a validated answer or is counted as a failure.

Each retry changes what can change the outcome: attempt 2 doubles the token budget (a JSON
answer cut off at the budget is the usual failure), attempt 3 also drops the reasoning field.
Backend-agnostic: the same loop drives the llama.cpp engine, the oracle and test backends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extractor.backend import Backend, Request, Result
from extractor.dragon_io import Case
from extractor.prompts import PromptBuilder
from extractor.schema import AnswerError, parse_answer
from extractor.taskfiles import Taskfile

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


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

    @property
    def ok(self) -> bool:
        return self.answer is not None


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
    errors: dict[str, int] = field(default_factory=dict)


def _classify(message: str) -> str:
    return message.split(":", 1)[0][:60]


def answer_cases(
    cases: Sequence[Case],
    builder: PromptBuilder,
    backend: Backend,
    *,
    on_result: Callable[[CaseAnswer], None] | None = None,
) -> tuple[dict[str, CaseAnswer], GenerationStats]:
    """Ask the backend about every non-blank case, retrying failures up to three attempts in all."""
    tf = builder.tf
    plan = attempt_plan(tf)
    stats = GenerationStats(cases=len(cases))
    answers: dict[str, CaseAnswer] = {}
    pending: list[Case] = []
    for case in cases:
        if case.is_blank:
            stats.blank += 1
            answers[case.uid] = CaseAnswer(uid=case.uid, error="blank report")
        else:
            pending.append(case)
    by_uid = {c.uid: c for c in pending}
    for number, attempt in enumerate(plan, start=1):
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
            )
            requests.append(p.request)
            if number == 1:
                stats.truncated += p.truncated
                stats.examples += p.examples
        failed: list[Case] = []
        for result in _generate(backend, requests):
            case = by_uid[result.uid]
            entry = answers.setdefault(result.uid, CaseAnswer(uid=result.uid))
            entry.attempts = number
            entry.prompt_tokens += result.prompt_tokens
            entry.output_tokens += result.output_tokens
            stats.prompt_tokens += result.prompt_tokens
            stats.output_tokens += result.output_tokens
            try:
                if result.error:
                    raise AnswerError(result.error)
                if not result.finished:
                    raise AnswerError(f"token budget exhausted after {result.output_tokens} tokens")
                entry.answer = parse_answer(result.text, tf)
                entry.likelihoods = result.likelihoods
                entry.error = None
                stats.answered += 1
                if on_result:
                    on_result(entry)
            except AnswerError as err:
                entry.error = str(err)
                stats.errors[_classify(str(err))] = stats.errors.get(_classify(str(err)), 0) + 1
                log.debug("uid %s attempt %d failed: %s", result.uid, number, err)
                failed.append(case)
        pending = failed
    for case in pending:
        stats.failures += 1
        if on_result:
            on_result(answers[case.uid])
    return answers, stats


def _generate(backend: Backend, requests: Iterable[Request]):
    """Run the backend; a crash inside it fails the whole batch as errors rather than the job."""
    requests = list(requests)
    seen: set[str] = set()
    try:
        for result in backend.generate(requests):
            seen.add(result.uid)
            yield result
    except Exception as err:  # noqa: BLE001 - one bad batch never kills a job
        log.exception("backend %s failed", getattr(backend, "name", "?"))
        for req in requests:
            if req.uid not in seen:
                yield Result(uid=req.uid, text="", error=f"backend error: {err}")
