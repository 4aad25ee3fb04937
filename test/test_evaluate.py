"""The evaluation command, and the perfect-model round trip that must score 1.000."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest
from conftest import GROUND_TRUTH, JOBS, REPO, SYNTHETIC, needs_synthetic

from extractor import evaluate


def run_eval(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = evaluate.main(list(args))
    return code, capsys.readouterr().out


def scores(out: str) -> dict[str, float]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("Task"):
            rows[cells[0]] = float(cells[4])
    return rows


def test_oracle_scores_one_on_the_project_fixtures(tmp_path: Path, capsys) -> None:
    code, out = run_eval(
        capsys, "--jobs", str(JOBS), "--ground-truth", str(GROUND_TRUTH), "--out", str(tmp_path), "--backend", "oracle"
    )
    assert code == 0
    assert len(scores(out)) == 9 and all(v == 1.0 for v in scores(out).values()), out
    assert out.strip().splitlines()[-1] == "overall 1.0000"
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "results.md").is_file()


@needs_synthetic
def test_oracle_scores_one_on_the_synthetic_dragon_jobs(tmp_path: Path, capsys) -> None:
    code, out = run_eval(
        capsys,
        "--jobs", str(SYNTHETIC / "input"),
        "--ground-truth", str(SYNTHETIC / "ground-truth"),
        "--out", str(tmp_path),
        "--backend", "oracle",
    )  # fmt: skip
    assert code == 0
    assert scores(out) == {t: 1.0 for t in scores(out)} and len(scores(out)) == 9, out


def test_prior_floor_runs_and_scores_below_the_oracle(tmp_path: Path, capsys) -> None:
    code, out = run_eval(
        capsys, "--jobs", str(JOBS), "--ground-truth", str(GROUND_TRUTH), "--out", str(tmp_path), "--backend", "prior"
    )
    assert code == 0
    overall = float(out.strip().splitlines()[-1].split()[1])
    assert 0.0 <= overall < 0.9


def test_max_cases_and_several_folds(tmp_path: Path, capsys) -> None:
    jobs = tmp_path / "jobs"
    for fold in (0, 1):
        shutil.copytree(JOBS / "Task106_Example_sl_reg-fold0", jobs / f"Task106_Example_sl_reg-fold{fold}")
    code, out = run_eval(
        capsys,
        "--jobs",
        str(jobs),
        "--ground-truth",
        str(GROUND_TRUTH),
        "--out",
        str(tmp_path / "o"),
        "--backend",
        "oracle",
        "--max-cases",
        "3",
    )
    assert code == 0 and "| Task106_Example_sl_reg | 1 |" in out
    records = orjson.loads(
        (tmp_path / "o" / "predictions" / "Task106_Example_sl_reg-fold1" / "nlp-predictions-dataset.json").read_bytes()
    )
    assert len(records) == 3


def test_unknown_task_names_get_per_case_agreement(tmp_path: Path, capsys) -> None:
    jobs, gt = tmp_path / "jobs", tmp_path / "gt"
    src = JOBS / "Task101_Example_sl_bin_clf-fold0"
    dst = jobs / "Task555_custom-fold0"
    shutil.copytree(src, dst)
    config = orjson.loads((dst / "nlp-task-configuration.json").read_bytes())
    (dst / "nlp-task-configuration.json").write_bytes(orjson.dumps({**config, "task_name": "Task555_custom"}))
    gt.mkdir()
    shutil.copy(GROUND_TRUTH / "Task101_Example_sl_bin_clf.json", gt / "Task555_custom.json")
    code, out = run_eval(
        capsys, "--jobs", str(jobs), "--ground-truth", str(gt), "--out", str(tmp_path / "o"), "--backend", "oracle"
    )
    assert code == 0 and "per-case agreement" in out and scores(out)["Task555_custom"] == 1.0


def test_score_existing_predictions_and_catch_bad_ones(tmp_path: Path, capsys) -> None:
    run_eval(
        capsys, "--jobs", str(JOBS), "--ground-truth", str(GROUND_TRUTH), "--out", str(tmp_path), "--backend", "prior"
    )
    code, out = run_eval(
        capsys, "--jobs", str(JOBS), "--predictions", str(tmp_path / "predictions"), "--out", str(tmp_path / "v")
    )
    assert code == 0 and out.strip().splitlines()[-1] == "verified 9 jobs"
    bad = tmp_path / "predictions" / "Task101_Example_sl_bin_clf-fold0" / "nlp-predictions-dataset.json"
    bad.write_bytes(orjson.dumps(orjson.loads(bad.read_bytes())[:-1]))
    code, out = run_eval(
        capsys, "--jobs", str(JOBS), "--predictions", str(tmp_path / "predictions"), "--out", str(tmp_path / "v")
    )
    assert code == 1 and out.strip().splitlines()[-1] == "verified 8 jobs"


def test_fixture_files_are_up_to_date() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_jobs", REPO / "test" / "fixtures" / "make_jobs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path, data in module.expected_files().items():
        assert path.read_bytes() == data, f"{path} is stale: run python test/fixtures/make_jobs.py"


def test_metrics_count_answers_resumed_from_the_journal(tmp_path: Path, capsys) -> None:
    """A rerun over the same work dir resumes every answer, and metrics.json says so (the results
    table divides seconds by generated reports only)."""
    jobs = tmp_path / "jobs"
    shutil.copytree(JOBS / "Task106_Example_sl_reg-fold0", jobs / "Task106_Example_sl_reg-fold0")
    common = ["--jobs", str(jobs), "--ground-truth", str(GROUND_TRUTH), "--backend", "oracle"]
    common += ["--max-cases", "3", "--work-dir", str(tmp_path / "w")]
    resumed = []
    for name in ("first", "again"):
        code, _ = run_eval(capsys, *common, "--out", str(tmp_path / name))
        assert code == 0
        resumed.append(orjson.loads((tmp_path / name / "metrics.json").read_bytes())["jobs"][0]["resumed"])
    assert resumed == [0, 3]
