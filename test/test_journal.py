from __future__ import annotations

from pathlib import Path

from extractor.generation import CaseAnswer
from extractor.journal import Journal, journal_key


def test_answers_survive_and_a_torn_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j = Journal(path)
    j.append(CaseAnswer(uid="a", answer={"x": 1.0}, likelihoods={"x": {"true": -0.1}}, attempts=1))
    j.append(CaseAnswer(uid="b", error="failed", attempts=3))
    j.close()
    with open(path, "ab") as fh:
        fh.write(b'{"uid": "c", "answ')
    loaded = Journal(path).load()
    assert set(loaded) == {"a"}  # "b" failed: a rerun asks again
    assert loaded["a"].ok and loaded["a"].likelihoods == {"x": {"true": -0.1}}


def test_only_full_quality_successes_are_resumed(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.jsonl")
    j.append(CaseAnswer(uid="full", answer={"x": 1.0}, attempts=1))
    j.append(CaseAnswer(uid="rushed", answer={"x": 2.0}, attempts=1, level=1))
    j.append(CaseAnswer(uid="gave-up", error="token budget exhausted", attempts=2))
    j.append(CaseAnswer(uid="retried", error="engine", attempts=1))
    j.append(CaseAnswer(uid="retried", answer={"x": 3.0}, attempts=3))  # a later success wins
    j.close()
    assert set(Journal(tmp_path / "j.jsonl").load()) == {"full", "retried"}


def test_a_rerun_with_time_asks_again_what_the_budget_degraded(tmp_path: Path) -> None:
    """End to end through the generation loop: a tight deadline degrades answers (no reasoning);
    the journal keeps them, and a rerun without a deadline answers them as configured."""
    from test_resilience import TF, FakeClock, Timed

    from extractor.backend import PlainTokenizer
    from extractor.dragon_io import Case
    from extractor.generation import TimeBudget, answer_cases
    from extractor.prompts import PromptBuilder

    cases = [Case(str(i), text="x") for i in range(40)]
    builder = PromptBuilder(TF, PlainTokenizer(), truncation_side="left", context_limit=100_000)
    clock = FakeClock()
    backend = Timed(clock, lambda r: 10.0 if "reasoning" in r.schema["properties"] else 4.0)
    journal = Journal(tmp_path / "j.jsonl")
    _, first = answer_cases(
        cases, builder, backend, budget=TimeBudget(deadline=200.0, reserve_s=0.0, clock=clock),
        on_result=journal.append, chunk_size=8,
    )  # fmt: skip
    journal.close()
    assert sum(first.degraded.values()) > 0
    done = Journal(tmp_path / "j.jsonl").load()
    full = {uid for uid, a in done.items() if a.level == 0}
    assert set(done) == full and 0 < len(full) < 40
    rerun = Timed(FakeClock(), lambda r: 1.0)
    _, second = answer_cases(cases, builder, rerun, done=done, chunk_size=8)
    assert second.resumed == len(full) and second.degraded == {}
    assert {r.uid for r in rerun.seen} == {c.uid for c in cases} - full
    assert all("reasoning" in r.schema["properties"] for r in rerun.seen)


def test_key_changes_with_what_decides_the_answers(tmp_path: Path) -> None:
    f = tmp_path / "input.json"
    f.write_text("[1]")
    base = journal_key("llama", "sha-model", "sha-taskfile", files=[f])
    assert base == journal_key("llama", "sha-model", "sha-taskfile", files=[f])
    assert base != journal_key("llama", "other-model", "sha-taskfile", files=[f])
    assert base != journal_key("llama", "sha-model", "other-taskfile", files=[f])
    f.write_text("[2]")
    assert base != journal_key("llama", "sha-model", "sha-taskfile", files=[f])
