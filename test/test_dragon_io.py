from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from conftest import write_job

from extractor.dragon_io import (
    PREDICTIONS_FILE,
    JobError,
    PredictionError,
    load_job,
    verify_predictions,
    write_predictions,
)

BIN = "single_label_binary_classification_target"


def test_load_job_reads_cases_and_ignores_unknown_keys(bin_job: Path) -> None:
    data = orjson.loads((bin_job / "nlp-training-dataset.json").read_bytes())
    data[0]["center"] = "extra key"
    (bin_job / "nlp-training-dataset.json").write_bytes(orjson.dumps(data))
    job = load_job(bin_job)
    assert len(job.train) == 9 and len(job.test) == 4
    assert job.train[0].label is True and job.test[0].label is None
    assert job.task_type.prediction_key == "single_label_binary_classification"


def test_integer_uids_become_strings(tmp_path: Path) -> None:
    job_dir = write_job(
        tmp_path, label_name=BIN, train=[{"uid": 1, "text": "a", BIN: True}], test=[{"uid": 7, "text": "b"}]
    )
    job = load_job(job_dir)
    assert job.train[0].uid == "1" and job.test[0].uid == "7"


def test_missing_file_is_named(bin_job: Path) -> None:
    (bin_job / "nlp-test-dataset.json").unlink()
    with pytest.raises(JobError, match="nlp-test-dataset.json: missing input file"):
        load_job(bin_job)


def test_missing_validation_file_is_allowed(bin_job: Path) -> None:
    (bin_job / "nlp-validation-dataset.json").unlink()
    assert load_job(bin_job).validation == ()


def test_malformed_json_names_file_and_position(bin_job: Path) -> None:
    (bin_job / "nlp-training-dataset.json").write_text('[{"uid": "a",, }]')
    with pytest.raises(JobError, match=r"nlp-training-dataset.json: malformed JSON: .*(line|char)"):
        load_job(bin_job)


def test_bad_label_names_record_and_field(tmp_path: Path) -> None:
    train = [{"uid": "a", "text": "x", BIN: True}, {"uid": "b", "text": "y", BIN: "yes"}]
    job_dir = write_job(tmp_path, label_name=BIN, train=train, test=[])
    with pytest.raises(JobError, match=r"record 1 \(uid b\): field 'single_label_binary_classification_target'"):
        load_job(job_dir)


def test_unknown_label_name_lists_known_ones(tmp_path: Path) -> None:
    job_dir = write_job(tmp_path, label_name="weird_target", train=[], test=[])
    with pytest.raises(JobError, match="known: .*single_label_regression_target"):
        load_job(job_dir)


def test_duplicate_uids_are_an_error(tmp_path: Path) -> None:
    job_dir = write_job(tmp_path, label_name=BIN, train=[], test=[{"uid": "a", "text": "x"}, {"uid": "a", "text": "y"}])
    with pytest.raises(JobError, match="duplicate uid"):
        load_job(job_dir)


def test_ner_label_length_must_match_words(tmp_path: Path) -> None:
    label = "named_entity_recognition_target"
    train = [{"uid": "a", "text_parts": ["w1", "w2"], label: ["O"]}]
    job_dir = write_job(tmp_path, label_name=label, input_name="text_parts", train=train, test=[])
    with pytest.raises(JobError, match="expected 2 tags"):
        load_job(job_dir)


def test_verify_accepts_good_predictions(bin_job: Path) -> None:
    job = load_job(bin_job)
    records = [{"uid": c.uid, "single_label_binary_classification": 0.25} for c in job.test]
    verify_predictions(records, job)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop(), "without prediction"),
        (lambda r: r.append(dict(r[0])), "predicted twice"),
        (lambda r: r[0].update(extra=1), "keys"),
        (lambda r: r[0].update(single_label_binary_classification=1), "float probability"),
        (lambda r: r[0].update(single_label_binary_classification=1.5), "float probability"),
        (lambda r: r[0].update(uid="nope"), "not a test uid"),
    ],
)
def test_verify_rejects_what_dragon_rejects(bin_job: Path, mutate, message: str) -> None:
    job = load_job(bin_job)
    records = [{"uid": c.uid, "single_label_binary_classification": 0.5} for c in job.test]
    mutate(records)
    with pytest.raises(PredictionError, match=message):
        verify_predictions(records, job)


def test_verify_checks_list_lengths(tmp_path: Path) -> None:
    label = "multi_label_regression_target"
    job_dir = write_job(
        tmp_path,
        label_name=label,
        train=[{"uid": "a", "text": "x", label: [1.0, None]}],
        test=[{"uid": "b", "text": "y"}],
    )
    job = load_job(job_dir)
    verify_predictions([{"uid": "b", "multi_label_regression": [1.0, 0.0]}], job)
    with pytest.raises(PredictionError, match="list of 2 values"):
        verify_predictions([{"uid": "b", "multi_label_regression": [1.0]}], job)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write_predictions([{"uid": "a", "x": 1.0}], out)
    assert path == out / PREDICTIONS_FILE
    assert orjson.loads(path.read_bytes()) == [{"uid": "a", "x": 1.0}]
    assert [p.name for p in out.iterdir()] == [PREDICTIONS_FILE]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_predictions([{"uid": "a", "x": 1.0}], out)
    with pytest.raises(TypeError):
        write_predictions([{"uid": "a", "x": object()}], out)
    assert orjson.loads((out / PREDICTIONS_FILE).read_bytes()) == [{"uid": "a", "x": 1.0}]
    assert [p.name for p in out.iterdir()] == [PREDICTIONS_FILE]
