"""process.py end to end: bad input, and real runs of the default model on every task type."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import DEFAULT_MODEL, GROUND_TRUTH, JOBS, REPO, needs_model

import process
from extractor import evaluate
from extractor.adapters import DragonAdapter
from extractor.heads import train_heads
from extractor.settings import parse_settings
from extractor.summary import RunSummary

PRED = "nlp-predictions-dataset.json"


def test_missing_input_file_exits_1_and_writes_nothing(tmp_path: Path, caplog) -> None:
    job = tmp_path / "job"
    shutil.copytree(JOBS / "Task101_Example_sl_bin_clf-fold0", job)
    (job / "nlp-training-dataset.json").unlink()
    code = process.main(["--input", str(job), "--output", str(tmp_path / "out")])
    assert code == 1 and "nlp-training-dataset.json: missing input file" in caplog.text
    assert not (tmp_path / "out" / PRED).exists()


def test_missing_model_names_every_place(tmp_path: Path, caplog) -> None:
    code = process.main(
        [
            "--input",
            str(JOBS / "Task101_Example_sl_bin_clf-fold0"),
            "--output",
            str(tmp_path),
            "--model",
            str(tmp_path / "none.gguf"),
        ]
    )
    assert code == 1 and "none.gguf" in caplog.text


def test_empty_test_set_gives_an_empty_array(tmp_path: Path) -> None:
    job = tmp_path / "job"
    shutil.copytree(JOBS / "Task101_Example_sl_bin_clf-fold0", job)
    (job / "nlp-test-dataset.json").write_text("[]")
    assert process.main(["--input", str(job), "--output", str(tmp_path / "out")]) == 0
    assert orjson.loads((tmp_path / "out" / PRED).read_bytes()) == []


@needs_model
def test_cli_runs_the_default_model_and_writes_a_summary(tmp_path: Path) -> None:
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    cmd = [
        sys.executable,
        "process.py",
        "--input",
        str(JOBS / "Task101_Example_sl_bin_clf-fold0"),
        "--output",
        str(out),
    ]
    cmd += ["--max-cases", "2", "--summary", str(summary), "--work-dir", str(tmp_path / "work")]  # no old journal
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = orjson.loads((out / PRED).read_bytes())
    assert [set(r) for r in records] == [{"uid", "single_label_binary_classification"}] * 2
    assert all(0.0 <= r["single_label_binary_classification"] <= 1.0 for r in records)
    data = orjson.loads(summary.read_bytes())
    assert data["model"] == DEFAULT_MODEL.name and len(data["model_sha256"]) == 64
    assert data["cases"] == 2 and data["output_tokens"] > 0 and "llama-cpp-python" in data["versions"]
    assert "summary: cases 2" in proc.stderr and "stage: generate" in proc.stderr


@needs_model
@pytest.mark.model
def test_default_model_on_every_task_type_scores_with_dragon_eval(tmp_path: Path, capsys) -> None:
    """All eight task types through the real model; dragon-eval must score every job."""
    code = evaluate.main(
        ["--jobs", str(JOBS), "--ground-truth", str(GROUND_TRUTH), "--out", str(tmp_path), "--max-cases", "2"]
        + ["--max-output-tokens", "256"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("| Task1") == 9 and "error" not in out
    assert out.strip().splitlines()[-1].startswith("overall ")


@needs_model
def test_translation_pass_runs_with_the_default_model(tmp_path: Path) -> None:
    job = JOBS / "Task101_Example_sl_bin_clf-fold0"  # short reports keep the translation quick
    summary = tmp_path / "s.json"
    args = ["--input", str(job), "--output", str(tmp_path / "o"), "--max-cases", "1", "--translate"]
    assert process.main([*args, "--summary", str(summary), "--reasoning", "off"]) == 0
    assert orjson.loads(summary.read_bytes())["translated"] == 1
    assert len(orjson.loads((tmp_path / "o" / PRED).read_bytes())) == 1


@needs_model
def test_example_strategies_compete_with_the_base_on_validation(tmp_path: Path) -> None:
    summary = tmp_path / "s.json"
    args = ["--input", str(JOBS / "Task101_Example_sl_bin_clf-fold0"), "--output", str(tmp_path / "o")]
    args += ["--max-cases", "1", "--validation-cases", "3", "--try-examples", "none,fixed"]
    assert process.main([*args, "--summary", str(summary), "--work-dir", str(tmp_path / "w")]) == 0
    choice = orjson.loads(summary.read_bytes())["choice"]
    base, model = choice["base"], choice["model"]
    assert {"llm[retrieved]", "llm[none]", "llm[fixed]", base["chosen"]} <= set(model["scores"])
    assert set(model["cases"].values()) == {3} and set(base["cases"].values()) == {4}
    best = round(max(v for v in model["scores"].values() if v is not None), 6)
    assert round(model["scores"][choice["chosen"]], 6) == best


@needs_model
def test_batched_engine_is_the_default_and_answers_as_one_at_a_time(tmp_path: Path) -> None:
    """Same predictions whether reports are decoded together (the default) or one by one
    (--parallel 1); six reports through three sequences exercise the refill, reasoning the free text.
    Without a validation set there is no choice to lose: the model answers every test report."""
    job = tmp_path / "job"
    shutil.copytree(JOBS / "Task102_Example_sl_mc_clf-fold0", job)
    (job / "nlp-validation-dataset.json").write_bytes(b"[]")
    runs = {}
    for name, parallel in (("batched", "3"), ("single", "1")):
        summary = tmp_path / f"{name}.json"
        args = ["--input", str(job), "--output", str(tmp_path / name), "--max-cases", "6", "--no-journal"]
        args += ["--parallel", parallel, "--summary", str(summary), "--max-output-tokens", "96"]
        assert process.main(args) == 0
        runs[name] = ((tmp_path / name / PRED).read_bytes(), orjson.loads(summary.read_bytes()))
    assert runs["batched"][0] == runs["single"][0]
    assert runs["batched"][1]["engine"]["extra"]["n_seq"] == 3
    assert runs["single"][1]["engine"]["extra"]["n_seq"] == 1
    assert runs["batched"][1]["output_tokens"] == runs["single"][1]["output_tokens"] > 0


BIN_LABEL = "single_label_binary_classification_target"
REG_LABEL = "single_label_regression_target"


def _validation_run(tmp_path: Path, task: str, label: str, wrong=None) -> tuple[RunSummary, list, list]:
    """A fixture job on the oracle, whose validation answers are the true labels or, with `wrong`,
    wrong ones; returns the summary, the predictions and the base's (the best head's) answers."""
    job_dir = JOBS / f"{task}-fold0"
    validation = orjson.loads((job_dir / "nlp-validation-dataset.json").read_bytes())
    truth = orjson.loads((GROUND_TRUTH / f"{task}.json").read_bytes())
    truth += [{"uid": c["uid"], label: wrong(c[label]) if wrong else c[label]} for c in validation]
    gt = tmp_path / "truth.json"
    gt.write_bytes(orjson.dumps(truth))
    args = ["--input", str(job_dir), "--output", str(tmp_path / "o"), "--no-journal", "--validation-cases", "4"]
    summary = process.run_job(parse_settings(args), backend="oracle", ground_truth=gt)
    job = DragonAdapter().load(job_dir)
    heads = train_heads(job.train, job.task_type, seed=job.config.jobid)
    (head,) = [h for h in heads if h.name == summary.choice["base"]["chosen"]]
    preds = [r[job.task_type.prediction_key] for r in orjson.loads((tmp_path / "o" / PRED).read_bytes())]
    return summary, preds, head.predict(job.test)


def test_validation_choice_keeps_the_model_that_answers_right(tmp_path: Path) -> None:
    summary, preds, base = _validation_run(tmp_path, "Task101_Example_sl_bin_clf", BIN_LABEL)
    assert summary.choice["model"]["scores"]["llm"] == 1.0 and summary.choice["chosen"] == "llm"
    assert summary.answered == len(preds) == 6 and preds != base


def test_the_base_answers_the_test_set_when_it_beats_the_model_on_validation(tmp_path: Path) -> None:
    """Regression has no blends, so the model alone meets the base; its wrong validation answers lose."""
    summary, preds, base = _validation_run(tmp_path, "Task106_Example_sl_reg", REG_LABEL, wrong=lambda v: v * 7 + 50)
    model = summary.choice["model"]
    assert summary.choice["chosen"] == summary.choice["base"]["chosen"] != "llm"
    assert model["scores"]["llm"] < model["scores"][summary.choice["chosen"]]
    assert summary.answered == 0 and preds == base  # the model was not asked about the test set
    assert any(
        line.startswith(f"answered by {summary.choice['chosen']}: chosen on 4 validation cases")
        for line in summary.log_lines()
    )
