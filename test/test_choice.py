"""The validation choice with scripted candidates: ties, failures, no validation set, and the
pipeline's two rounds on small jobs (no model: the oracle and scripted answers)."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from conftest import write_job

import process
from extractor.choice import Candidate, Precomputed, Scored, choose_base, choose_with_model, mix_per_field, pick
from extractor.choice import agreement as label_agreement
from extractor.dragon_io import Case, load_job, verify_predictions
from extractor.settings import parse_settings

PRED = "nlp-predictions-dataset.json"


def agreement(truths, values) -> float:
    return sum(t == v for t, v in zip(truths, values, strict=True)) / len(truths)


def const(name: str, value, cost: int = 0) -> Candidate:
    return Candidate(name, lambda cases: [value] * len(cases), cost=cost)


VAL = [Case(str(i), text="x", label="a" if i < 3 else "b") for i in range(4)]


def test_the_best_candidate_wins_and_the_margin_is_reported() -> None:
    choice = choose_base([const("always-b", "b"), const("always-a", "a")], VAL, agreement)
    assert choice.chosen == "always-a" and choice.margin == pytest.approx(0.5)
    assert choice.as_dict()["scores"] == {"always-b": 0.25, "always-a": 0.75}


def test_ties_to_six_decimals_go_to_the_lower_cost_then_the_earlier() -> None:
    scored = [Scored("x", 0.5 + 1e-9, 4), Scored("y", 0.5, 4), Scored("z", 0.5, 4)]
    assert pick(scored, {"x": 1, "y": 0, "z": 0}).chosen == "y"
    assert pick(scored, {}).chosen == "x"


def test_a_candidate_that_fails_is_scored_none_and_never_chosen(caplog: pytest.LogCaptureFixture) -> None:
    def broken(cases):
        raise RuntimeError("head exploded")

    choice = choose_base([Candidate("broken", broken), const("always-b", "b")], VAL, agreement)
    assert choice.chosen == "always-b"
    assert choice.as_dict()["scores"]["broken"] is None and "head exploded" in choice.as_dict()["errors"]["broken"]
    assert "candidate broken failed on validation" in caplog.text


def test_a_wrong_number_of_predictions_is_a_failure() -> None:
    short = Candidate("short", lambda cases: ["a"])
    assert choose_base([short, const("always-a", "a")], VAL, agreement).chosen == "always-a"


def test_no_validation_cases_keeps_the_first_candidate(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        choice = choose_base([const("head", "a"), const("prior", "b")], [], agreement)
    assert choice.chosen == "head" and "no validation cases" in caplog.text


def test_the_model_wins_ties_and_the_base_must_win_outright() -> None:
    base = const("head", "a")
    tie = choose_with_model(base, {"llm": lambda cases: ["a"] * len(cases)}, VAL, agreement)
    assert tie.chosen == "llm"
    worse = choose_with_model(base, {"llm": lambda cases: ["b"] * len(cases)}, VAL, agreement)
    assert worse.chosen == "head"
    blend_tie = choose_with_model(
        base, {"llm+head@0.5": lambda cases: ["a"] * len(cases)}, VAL, agreement, blends=["llm+head@0.5"]
    )
    assert blend_tie.chosen == "head"  # a blend that only ties the base is the base at the model's cost


def test_agreement_counts_label_positions_answered_right() -> None:
    assert label_agreement(["a", "b", "b", "a"], ["a", "b", "a", "a"]) == 0.75
    assert label_agreement([[1, 0], [0, 0]], [[0.9, 0.6], [0.2, 0.4]]) == 0.0  # AUC ranks probabilities: no count
    assert label_agreement([[True, "a"], [False, "b"]], [[0.2, "a"], [0.9, "a"]]) == 0.5  # only the labels count
    assert label_agreement([["O", "B-x", "I-x"]], [["O", "B-x", "O"]]) == pytest.approx(2 / 3)  # NER: tag by tag
    assert label_agreement([2.5, 3.0], [2.5, 3.1]) == 0.5
    assert label_agreement([["a", "b"]], [["a"]]) == 0.0  # a wrong shape is one wrong position
    assert label_agreement([], []) == 0.0


def test_a_tie_on_the_metric_goes_to_the_candidate_that_agrees_with_more_labels(caplog) -> None:
    scored = [Scored("cheap", 0.5, 4, agreement=0.5), Scored("dear", 0.5, 4, agreement=0.75)]
    with caplog.at_level(logging.INFO):
        assert pick(scored, {"cheap": 0, "dear": 1}).chosen == "dear"
    assert "dear agrees with more labels" in caplog.text
    assert pick([Scored("cheap", 0.5, 4, agreement=0.5), Scored("dear", 0.6, 4)], {"dear": 1}).chosen == "dear"


def test_a_one_class_sample_the_metric_cannot_separate_goes_to_the_more_right_answers() -> None:
    """Kappa on a validation sample of one class is 0 for every candidate (Task103's first 8
    validation cases): the model must not win that tie when it answers fewer of the cases right."""
    one_class = [Case(str(i), text="x", label="entailment") for i in range(8)]

    def kappa_like(truths, values) -> float:
        return 0.0  # undefined on one class, counted as 0 like dragon-eval's NaN

    base = const("head", "entailment")
    chance = {"llm": lambda cases: ["entailment", "neutral"] * (len(cases) // 2)}
    assert choose_with_model(base, chance, one_class, kappa_like).chosen == "head"
    perfect = {"llm": lambda cases: ["entailment"] * len(cases)}
    assert choose_with_model(base, perfect, one_class, kappa_like).chosen == "llm"  # all right too: the model's tie
    assert choose_with_model(const("prior", "neutral"), perfect, one_class, kappa_like).chosen == "llm"


def test_two_perfect_rankings_tie_and_the_model_wins_as_before() -> None:
    """AUC 1.0 for both: how the probabilities fall around 0.5 must not decide (the model's tie)."""
    ranked = [Case(str(i), text="x", label=i >= 2) for i in range(4)]
    base = Candidate("head", lambda cases: [0.9 if c.label else 0.1 for c in cases])
    model = {"llm": lambda cases: [0.8 if c.label else 0.6 for c in cases]}  # all above 0.5, still ranked right

    def auc_like(truths, values) -> float:
        return 1.0

    assert choose_with_model(base, model, ranked, auc_like).chosen == "llm"


def test_precomputed_answers_are_computed_once_and_looked_up() -> None:
    calls = []

    def predict(cases):
        calls.append(len(cases))
        return [c.uid for c in cases]

    pre = Precomputed(Candidate("h", predict, shares=lambda cases: [[{"a": 1.0}] for _ in cases]), VAL)
    assert [pre(c) for c in VAL] == ["0", "1", "2", "3"] and calls == [4]
    assert pre.shares(VAL[0]) == [{"a": 1.0}] and pre.blendable


LABEL = "single_label_multi_class_classification_target"


def _words_job(tmp_path: Path, *, validation: bool = True, one_class: bool = False) -> Path:
    """A job a head learns at once: the label is the report's colour word."""
    colours = ["rood", "groen", "blauw"]

    def rec(prefix: str, i: int, labelled: bool) -> dict:
        colour = colours[0] if one_class else colours[i % 3]
        r = {"uid": f"{prefix}{i}", "text": f"verslag {i}: de laesie is {colour} gekleurd"}
        return {**r, LABEL: colour} if labelled else r

    return write_job(
        tmp_path / "job",
        label_name=LABEL,
        train=[rec("t", i, True) for i in range(30)],
        validation=[rec("v", i, True) for i in range(9)] if validation else [],
        test=[rec("x", i, False) for i in range(6)],
    )


def _run(tmp_path: Path, job: Path, *extra: str, backend: str = "llama"):
    args = ["--input", str(job), "--output", str(tmp_path / "out"), "--no-journal", *extra]
    summary = process.run_job(parse_settings(args), backend=backend)
    records = orjson.loads((tmp_path / "out" / PRED).read_bytes())
    verify_predictions(records, load_job(job))
    return summary, records


def test_validation_cases_0_answers_with_the_best_head_without_any_model(tmp_path: Path) -> None:
    summary, records = _run(tmp_path, _words_job(tmp_path), "--validation-cases", "0", "--model", "/nonexistent")
    assert summary.choice["chosen"] not in ("vote", "prior") and summary.answered == 0
    assert [r["single_label_multi_class_classification"] for r in records] == ["rood", "groen", "blauw"] * 2


def test_no_validation_set_still_ends_with_valid_predictions(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        summary, records = _run(tmp_path, _words_job(tmp_path, validation=False), backend="prior")
    assert len(records) == 6 and "no validation cases" in caplog.text


def test_a_one_class_training_set_gets_the_prior_with_a_log_line(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        summary, records = _run(tmp_path, _words_job(tmp_path, one_class=True), "--validation-cases", "0")
    assert {r["single_label_multi_class_classification"] for r in records} == {"rood"}
    assert "single class" in caplog.text


def test_a_head_failing_on_the_test_set_never_costs_the_job(tmp_path: Path, monkeypatch) -> None:
    """If the chosen base cannot predict the test set, the next candidate answers it."""
    from extractor import heads

    real = heads.train_heads

    def flaky(train, ttype, *, seed=0):
        trained = real(train, ttype, seed=seed)
        for head in trained:
            original = head.predict
            head.predict = lambda cases, original=original: (
                original(cases) if cases and cases[0].uid.startswith("v") else (_ for _ in ()).throw(MemoryError())
            )
        return trained

    monkeypatch.setattr("extractor.pipeline.train_heads", flaky)
    summary, records = _run(tmp_path, _words_job(tmp_path), "--validation-cases", "0")
    assert len(records) == 6 and summary.choice["chosen"] in ("vote", "prior")


def test_validation_answers_stop_when_the_test_set_would_not_fit_the_time_left(tmp_path: Path) -> None:
    """Each report costs 10 s of a fake clock; with 100 s left and 6 test reports, the model answers
    only the validation chunks that leave time for the test set."""
    from types import SimpleNamespace

    from test_resilience import FakeClock, Timed

    from extractor.adapters import DragonAdapter
    from extractor.backend import PlainTokenizer
    from extractor.fewshot import Retriever
    from extractor.generation import TimeBudget
    from extractor.pipeline import JobRun

    job_dir = _words_job(tmp_path)
    clock = FakeClock()
    run = JobRun(parse_settings(["--input", str(job_dir)]), DragonAdapter())
    run.load_job()
    run.pick_taskfile()
    run.retriever = Retriever(run.job.train)
    run.backend = SimpleNamespace(tokenizer=PlainTokenizer())
    run.n_ctx = 100_000
    run.budget = TimeBudget(deadline=130.0, reserve_s=0.0, clock=clock)
    backend = Timed(clock, lambda r: 10.0)
    backend.n_seq = 2
    answers, sample, interrupted = run._answer_validation(list(run.job.validation), run.tf, backend)
    assert not interrupted and len(sample) == 4 < len(run.job.validation)  # 40 s spent, 60 s for 6 test reports
    assert set(answers) == {c.uid for c in sample}


# --- per-field mixes on multi-label tasks ---------------------------------------------------------

ML_VAL = [Case(str(i), text="x", label=["a" if i % 2 else "b", "c" if i < 2 else "d"]) for i in range(4)]


def pooled_agreement(truths, values) -> float:
    """Agreement pooled over label positions, as DRAGON pools most multi-label metrics."""
    pairs = [(t, v) for ts, vs in zip(truths, values, strict=True) for t, v in zip(ts, vs, strict=True)]
    return sum(t == v for t, v in pairs) / len(pairs)


def column(name: str, first: list, second: list) -> Candidate:
    """A candidate whose answers per case are scripted position by position."""
    return Candidate(name, lambda cases: [[first[int(c.uid)], second[int(c.uid)]] for c in cases])


FIRST_RIGHT = column("first-right", ["b", "a", "b", "a"], ["d", "d", "d", "d"])  # position 0 all right
SECOND_RIGHT = column("second-right", ["a", "a", "a", "a"], ["c", "c", "d", "d"])  # position 1 all right


def test_mix_per_field_takes_each_position_from_the_source_that_raises_the_score() -> None:
    values = {c.name: c.predict(ML_VAL) for c in (FIRST_RIGHT, SECOND_RIGHT)}
    truths = [c.label for c in ML_VAL]
    sources, score = mix_per_field(values, "first-right", truths, pooled_agreement)
    assert sources == ("first-right", "second-right") and score == 1.0
    alone, same = mix_per_field({"first-right": values["first-right"]}, "first-right", truths, pooled_agreement)
    assert alone == ("first-right", "first-right") and same == 0.75


def test_round_1_chooses_a_per_field_mix_only_when_asked_and_only_when_it_wins() -> None:
    plain = choose_base([FIRST_RIGHT, SECOND_RIGHT], ML_VAL, pooled_agreement)
    assert plain.chosen == "first-right" and plain.mixed is None
    mixed = choose_base([FIRST_RIGHT, SECOND_RIGHT], ML_VAL, pooled_agreement, per_field=True)
    assert mixed.chosen == "per-field[first-right,second-right]" and mixed.sources == ("first-right", "second-right")
    assert mixed.as_dict()["scores"][mixed.chosen] == 1.0 and mixed.margin == pytest.approx(0.25)
    assert mixed.mixed is not None and mixed.mixed.predict(ML_VAL) == [c.label for c in ML_VAL]
    assert mixed.mixed.shares is None  # the sources have no shares, so the mix cannot be blended
    same = column("same-as-first", ["b", "a", "b", "a"], ["d", "d", "d", "d"])
    tie = choose_base([FIRST_RIGHT, same], ML_VAL, pooled_agreement, per_field=True)
    assert tie.chosen == "first-right" and tie.mixed is None  # a mix that only ties is not taken
    val = [*ML_VAL, *(Case(str(i), text="x", label=["a", "d"]) for i in range(4, 400))]  # 800 positions
    first = column("first", ["b", "a", "b", "a", *["a"] * 396], ["d"] * 400)  # position 1 wrong on cases 0 and 1
    fix = column("fix", ["a"] * 400, ["c", "d", "d", "d", *["d"] * 396])  # right on case 0 only
    small = choose_base([first, fix], val, pooled_agreement, per_field=True)
    assert small.chosen == "first" and small.mixed is None  # the mix gains 1/800 < MIX_MIN_GAIN


def test_round_2_mixes_the_model_and_the_base_per_field() -> None:
    model = {"llm": SECOND_RIGHT.predict}
    choice = choose_with_model(FIRST_RIGHT, model, ML_VAL, pooled_agreement, per_field=True)
    assert choice.chosen == "llm|first-right per field" and choice.sources == ("first-right", "llm")
    assert choose_with_model(FIRST_RIGHT, model, ML_VAL, pooled_agreement).chosen == "llm"  # 0.75 ties: the model


def test_a_per_field_choice_answers_the_base_positions_with_the_base(tmp_path: Path) -> None:
    """`predictions` with model_fields: the model's value where marked, the base's elsewhere."""
    from extractor.generation import CaseAnswer
    from extractor.pipeline import predictions
    from extractor.taskfiles import Taskfile

    tf = Taskfile.model_validate(
        {
            "task_names": ["TaskX"],
            "label_name": "multi_label_multi_class_classification_target",
            "instructions": "x",
            "fields": [
                {"name": "one", "type": "label", "labels": ["a", "b"]},
                {"name": "two", "type": "label", "labels": ["c", "d"]},
            ],
        }
    )
    cases = ML_VAL[:2]
    answers = {c.uid: CaseAnswer(c.uid, answer={"one": "a", "two": "c"}) for c in cases}
    base = Precomputed(FIRST_RIGHT, cases)
    key = "multi_label_multi_class_classification"
    mixed = predictions(cases, tf, key, answers, base, 0.0, model_fields=(False, True))
    assert [r[key] for r in mixed] == [["b", "c"], ["a", "c"]]
    alone = predictions(cases, tf, key, answers, base, 0.0)
    assert [r[key] for r in alone] == [["a", "c"], ["a", "c"]]
