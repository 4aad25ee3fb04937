from __future__ import annotations

from collections.abc import Iterator, Sequence

import orjson

from extractor.backend import PlainTokenizer, Request, Result
from extractor.dragon_io import Case
from extractor.generation import answer_cases
from extractor.prompts import PromptBuilder
from extractor.taskfiles import Taskfile

TF = Taskfile.model_validate(
    dict(
        task_names=["T"],
        label_name="single_label_regression_target",
        instructions="size",
        fields=[{"name": "size", "type": "number"}],
        reasoning={"enabled": True, "max_chars": 100},
        max_output_tokens=40,
    )
)


class Scripted:
    """Answers from a script: uid -> list of (text, finished) per attempt."""

    name = "scripted"

    def __init__(self, script: dict[str, list[tuple[str, bool]]]) -> None:
        self.script = script
        self.seen: list[Request] = []

    def generate(self, requests: Sequence[Request]) -> Iterator[Result]:
        for req in requests:
            self.seen.append(req)
            text, finished = self.script[req.uid][req.attempt - 1]
            yield Result(uid=req.uid, text=text, finished=finished, output_tokens=len(text))


def run(script, cases):
    builder = PromptBuilder(TF, PlainTokenizer(), truncation_side="left", context_limit=100_000)
    backend = Scripted(script)
    answers, stats = answer_cases(cases, builder, backend)
    return answers, stats, backend


def test_good_answers_pass_on_the_first_attempt() -> None:
    answers, stats, backend = run({"a": [('{"reasoning": "r", "size": 3}', True)]}, [Case("a", text="r")])
    assert answers["a"].answer == {"size": 3.0} and stats.retries == 0 and stats.failures == 0
    assert len(backend.seen) == 1


def test_each_retry_changes_budget_then_reasoning() -> None:
    script = {"a": [('{"reasoning": "cut', False), ("not json", True), ('{"size": 5}', True)]}
    answers, stats, backend = run(script, [Case("a", text="r")])
    assert answers["a"].answer == {"size": 5.0} and answers["a"].attempts == 3
    budgets = [r.max_tokens for r in backend.seen]
    reasoning = ["reasoning" in r.schema["properties"] for r in backend.seen]
    assert budgets == [40, 80, 80] and reasoning == [True, True, False]
    assert stats.retries == 2 and stats.failures == 0


def test_three_failures_are_counted_and_others_go_on() -> None:
    script = {
        "bad": [("{", True), ('{"size": "big"}', True), ("", True)],
        "good": [('{"reasoning": "", "size": 1}', True)],
    }
    answers, stats, _ = run(script, [Case("bad", text="x"), Case("good", text="y")])
    assert not answers["bad"].ok and answers["bad"].error
    assert answers["good"].ok and stats.failures == 1 and stats.answered == 1


def test_blank_reports_never_reach_the_model() -> None:
    answers, stats, backend = run({}, [Case("blank", text="  \n ")])
    assert stats.blank == 1 and not answers["blank"].ok and backend.seen == []


def test_a_crashing_backend_fails_cases_not_the_job() -> None:
    class Crashing:
        name = "crash"

        def generate(self, requests):
            for req in requests:
                if req.uid == "b":
                    raise RuntimeError("device lost")
                yield Result(uid=req.uid, text=orjson.dumps({"reasoning": "", "size": 2}).decode())

    builder = PromptBuilder(TF, PlainTokenizer(), truncation_side="left", context_limit=100_000)
    answers, stats = answer_cases([Case("a", text="x"), Case("b", text="y")], builder, Crashing())
    assert answers["a"].ok and not answers["b"].ok and stats.failures == 1


class ScriptedWithErrors(Scripted):
    """As Scripted, but a text of None is an engine error result."""

    def generate(self, requests: Sequence[Request]) -> Iterator[Result]:
        for req in requests:
            self.seen.append(req)
            text, finished = self.script[req.uid][req.attempt - 1]
            if text is None:
                yield Result(uid=req.uid, text="", error="engine error: a batch failed")
            else:
                yield Result(uid=req.uid, text=text, finished=finished, output_tokens=len(text))


def test_an_identical_retry_is_only_made_after_an_engine_error() -> None:
    """Without reasoning, attempts 2 and 3 would send the same request; greedy decoding would give
    the same failure again, so only a case the engine failed (not the model) gets the third try."""
    tf = TF.model_copy(update={"reasoning": TF.reasoning.model_copy(update={"enabled": False})})
    builder = PromptBuilder(tf, PlainTokenizer(), truncation_side="left", context_limit=100_000)
    script = {
        "looping": [('{"size": 1', False), ('{"size": 11', False), ('{"size": 3}', True)],
        "crashed": [('{"size": 1', False), (None, True), ('{"size": 4}', True)],
    }
    backend = ScriptedWithErrors(script)
    answers, stats = answer_cases([Case("looping", text="x"), Case("crashed", text="y")], builder, backend)
    assert [(r.uid, r.attempt, r.max_tokens) for r in backend.seen] == [
        ("looping", 1, 40),
        ("crashed", 1, 40),
        ("looping", 2, 80),
        ("crashed", 2, 80),
        ("crashed", 3, 80),
    ]
    assert not answers["looping"].ok and answers["looping"].attempts == 2
    assert answers["crashed"].answer == {"size": 4.0}
    assert stats.failures == 1 and stats.retries == 3


def test_scores_without_reasoning_rank_while_the_answer_keeps_its_reasoning() -> None:
    """Reasoning on with `scores: without_reasoning`: a second request without the reasoning field
    gives the yes/no likelihoods (a ranking); the journal sees the answer once, rescored."""
    from extractor.backend import PlainTokenizer, Result
    from extractor.dragon_io import Case
    from extractor.generation import answer_cases
    from extractor.prompts import PromptBuilder
    from extractor.taskfiles import Taskfile

    tf = Taskfile.model_validate(
        {
            "task_names": ["T"],
            "label_name": "single_label_binary_classification_target",
            "instructions": "x",
            "fields": [{"name": "present", "type": "boolean"}],
            "reasoning": {"enabled": True, "max_chars": 50, "scores": "without_reasoning"},
        }
    )

    class TwoWays:
        name = "two-ways"

        def __init__(self) -> None:
            self.asked: list[bool] = []

        def generate(self, requests):
            for req in requests:
                reasoned = "reasoning" in req.schema["properties"]
                self.asked.append(reasoned)
                text = '{"reasoning": "r", "present": true}' if reasoned else '{"present": true}'
                score = {"true": -0.01, "false": -6.0} if reasoned else {"true": -0.5, "false": -0.9}
                yield Result(uid=req.uid, text=text, likelihoods={"present": score})

    backend = TwoWays()
    builder = PromptBuilder(tf, PlainTokenizer(), truncation_side="left", context_limit=100_000)
    seen = []
    answers, stats = answer_cases([Case("a", text="x"), Case("b", text="y")], builder, backend, on_result=seen.append)
    assert backend.asked == [True, True, False, False]
    assert answers["a"].likelihoods["present"] == {"true": -0.5, "false": -0.9}
    assert stats.answered == 2 and [a.uid for a in seen] == ["a", "b"]
    plain = tf.model_copy(update={"reasoning": tf.reasoning.model_copy(update={"scores": "after_reasoning"})})
    backend = TwoWays()
    builder = PromptBuilder(plain, PlainTokenizer(), truncation_side="left", context_limit=100_000)
    answers, _ = answer_cases([Case("a", text="x")], builder, backend)
    assert backend.asked == [True] and answers["a"].likelihoods["present"]["true"] == -0.01
