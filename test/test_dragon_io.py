from __future__ import annotations

import errno
import os
from pathlib import Path

import orjson
import pytest
from conftest import write_job

from extractor.dragon_io import (
    CONFIG_FILE,
    MAX_RECORD_WARNINGS,
    PREDICTIONS_FILE,
    TRAIN_FILE,
    JobError,
    PredictionError,
    atomic_write,
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


# The reliability table (README, "Reliability"): a defective training or validation record is
# dropped with a warning naming file, record and field; these tests asserted a failed job before.
def test_bad_label_drops_the_record_and_names_record_and_field(tmp_path: Path, caplog) -> None:
    train = [{"uid": "a", "text": "x", BIN: True}, {"uid": "b", "text": "y", BIN: "yes"}]
    job = load_job(write_job(tmp_path, label_name=BIN, train=train, test=[]))
    assert [c.uid for c in job.train] == ["a"] and job.dropped == {"train": 1}
    assert f"{TRAIN_FILE}: record 1 (uid b): field 'single_label_binary_classification_target'" in caplog.text
    assert "record dropped" in caplog.text


def test_null_single_label_regression_target_costs_one_record(tmp_path: Path) -> None:
    label = "single_label_regression_target"
    train = [{"uid": "a", "text": "x", label: 1.5}, {"uid": "b", "text": "y", label: None}]
    job = load_job(write_job(tmp_path, label_name=label, train=train, test=[{"uid": "q", "text": "z"}]))
    assert [c.uid for c in job.train] == ["a"] and job.dropped == {"train": 1}


def test_null_elements_of_multi_label_regression_targets_stay_valid(tmp_path: Path) -> None:
    label = "multi_label_regression_target"
    train = [{"uid": "a", "text": "x", label: [1.0, None]}, {"uid": "b", "text": "y", label: [None, None]}]
    job = load_job(write_job(tmp_path, label_name=label, train=train, test=[]))
    assert len(job.train) == 2 and job.dropped == {}


@pytest.mark.parametrize(
    "record, field",
    [
        ("not an object", "(record)"),
        ({"text": "x", BIN: True}, "uid"),
        ({"uid": None, "text": "x", BIN: True}, "uid"),
        ({"uid": 1.5, "text": "x", BIN: True}, "uid"),
        ({"uid": "r", BIN: True}, "text"),
        ({"uid": "r", "text": None, BIN: True}, "text"),
        ({"uid": "r", "text": ["a"], BIN: True}, "text"),
        ({"uid": "r", "text": "x"}, BIN),
        ({"uid": "r", "text": "x", BIN: None}, BIN),
        ({"uid": "r", "text": "x", BIN: 1}, BIN),
    ],
)
def test_every_record_defect_drops_one_training_record(tmp_path: Path, caplog, record, field: str) -> None:
    train = [{"uid": "a", "text": "x", BIN: True}, record]
    job = load_job(write_job(tmp_path, label_name=BIN, train=train, test=[], validation=[record]))
    assert [c.uid for c in job.train] == ["a"] and job.validation == ()
    assert job.dropped == {"train": 1, "validation": 1}
    assert f"record 1{' (uid r)' if field not in ('(record)', 'uid') else ''}: field {field!r}" in caplog.text


def test_ner_tags_not_matching_the_words_drop_the_record(tmp_path: Path) -> None:
    label = "named_entity_recognition_target"
    train = [{"uid": "a", "text_parts": ["w1", "w2"], label: ["O"]}, {"uid": "b", "text_parts": ["w"], label: ["O"]}]
    job = load_job(write_job(tmp_path, label_name=label, input_name="text_parts", train=train, test=[]))
    assert [c.uid for c in job.train] == ["b"] and job.dropped == {"train": 1}


def test_multi_label_ner_needs_a_tag_list_per_word(tmp_path: Path) -> None:
    label = "multi_label_named_entity_recognition_target"
    train = [
        {"uid": "a", "text_parts": ["w1", "w2"], label: [["O"], []]},
        {"uid": "b", "text_parts": ["w"], label: [["B-1-x"]]},
    ]
    job = load_job(write_job(tmp_path, label_name=label, input_name="text_parts", train=train, test=[]))
    assert [c.uid for c in job.train] == ["b"]


def test_multi_label_lists_of_another_length_are_dropped(tmp_path: Path, caplog) -> None:
    label = "multi_label_binary_classification_target"
    train = [{"uid": f"t{i}", "text": "x", label: [True, False]} for i in range(3)]
    train.append({"uid": "odd", "text": "x", label: [True]})
    validation = [{"uid": "v1", "text": "x", label: [True]}, {"uid": "v2", "text": "x", label: [True, True]}]
    job = load_job(write_job(tmp_path, label_name=label, train=train, test=[], validation=validation))
    assert [c.uid for c in job.train] == ["t0", "t1", "t2"] and job.label_length == 2
    assert [c.uid for c in job.validation] == ["v2"]
    assert job.dropped == {"train": 1, "validation": 1}
    assert "record 3 (uid odd)" in caplog.text and "expected a list of 2 values" in caplog.text


def test_test_records_with_unreadable_input_get_the_fallback(tmp_path: Path, caplog) -> None:
    test = [
        {"uid": "ok", "text": "fine"},
        {"uid": "missing"},
        {"uid": "null", "text": None},
        {"uid": "number", "text": 42},
        {"text": "no uid"},
        ["not", "an", "object"],
    ]
    job = load_job(write_job(tmp_path, label_name=BIN, train=[{"uid": "t", "text": "x", BIN: True}], test=test))
    assert [c.uid for c in job.test] == ["ok", "missing", "null", "number"]
    assert [c.is_blank for c in job.test] == [False, True, True, True]
    assert job.unreadable == ("missing", "null", "number") and job.dropped == {"test": 2}
    assert "record 3 (uid number): field 'text': expected a string, got 42; answered with the fallback" in caplog.text
    assert "record 4: field 'uid'" in caplog.text and "record dropped" in caplog.text


def test_unreadable_words_keep_their_count(tmp_path: Path) -> None:
    label = "named_entity_recognition_target"
    train = [{"uid": "t", "text_parts": ["a"], label: ["O"]}]
    test = [{"uid": "q", "text_parts": ["a", 7, None]}, {"uid": "r", "text_parts": "a b"}]
    job = load_job(write_job(tmp_path, label_name=label, input_name="text_parts", train=train, test=test))
    assert [c.parts for c in job.test] == [("", "", ""), ()]
    assert all(c.is_blank for c in job.test)


def test_many_defects_warn_a_bounded_number_of_times(tmp_path: Path, caplog) -> None:
    train = [{"uid": "a", "text": "x", BIN: True}] + [{"uid": f"b{i}", "text": "x", BIN: None} for i in range(50)]
    job = load_job(write_job(tmp_path, label_name=BIN, train=train, test=[]))
    assert job.dropped == {"train": 50}
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == MAX_RECORD_WARNINGS + 1 and "50 defective records in all" in warnings[-1].message


def test_no_usable_training_record_fails_the_job(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"nlp-training-dataset.json: no usable training record: all 2 records"):
        load_job(write_job(tmp_path, label_name=BIN, train=[{"uid": "a", "text": "x"}, {"uid": "b"}], test=[]))
    with pytest.raises(JobError, match="no usable training record: it is empty"):
        load_job(write_job(tmp_path, label_name=BIN, train=[], test=[]))


def test_unknown_label_name_lists_known_ones(tmp_path: Path) -> None:
    job_dir = write_job(tmp_path, label_name="weird_target", train=[], test=[])
    with pytest.raises(JobError, match="known: .*single_label_regression_target"):
        load_job(job_dir)


@pytest.mark.parametrize("which", ["train", "validation", "test"])
def test_duplicate_uids_are_an_error(tmp_path: Path, which: str) -> None:
    files = {
        "train": [{"uid": "a", "text": "x", BIN: True}],
        "validation": [{"uid": "v", "text": "x", BIN: True}],
        "test": [{"uid": "q", "text": "x"}],
    }
    files[which] = files[which] * 2
    job_dir = write_job(tmp_path, label_name=BIN, **files)
    with pytest.raises(JobError, match=r"record 1 \(uid .\): field 'uid': duplicate uid \(also record 0\)"):
        load_job(job_dir)


def test_config_hints_outside_the_specification_get_their_default(tmp_path: Path, caplog) -> None:
    job_dir = write_job(tmp_path, label_name=BIN, train=[{"uid": "a", "text": "x", BIN: True}], test=[])
    config = orjson.loads((job_dir / CONFIG_FILE).read_bytes())
    config.update(recommended_truncation_side="middle", jobid="one", version=2)
    (job_dir / CONFIG_FILE).write_bytes(orjson.dumps(config))
    job = load_job(job_dir)
    assert (job.config.recommended_truncation_side, job.config.jobid, job.config.version) == ("left", 0, "1.0")
    assert "field 'recommended_truncation_side': 'middle' is outside the specification" in caplog.text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"input_name": "words"}, "field 'input_name'"),
        ({"task_name": None}, "field 'task_name'"),
        ({"label_name": None}, "field 'label_name'"),
        ({"input_name": "words", "recommended_truncation_side": "up"}, "field 'input_name'"),
    ],
)
def test_config_fields_that_define_the_task_fail_the_job(tmp_path: Path, change, message: str) -> None:
    job_dir = write_job(tmp_path, label_name=BIN, train=[{"uid": "a", "text": "x", BIN: True}], test=[])
    config = {**orjson.loads((job_dir / CONFIG_FILE).read_bytes()), **change}
    (job_dir / CONFIG_FILE).write_bytes(orjson.dumps(config))
    with pytest.raises(JobError, match=f"{CONFIG_FILE}: {message}"):
        load_job(job_dir)


def test_an_unreadable_validation_file_is_left_out(bin_job: Path, caplog) -> None:
    (bin_job / "nlp-validation-dataset.json").write_text("[{")
    assert load_job(bin_job).validation == ()
    assert "running without the validation set" in caplog.text
    (bin_job / "nlp-validation-dataset.json").write_text('{"uid": "v"}')
    assert load_job(bin_job).validation == ()


def test_not_an_array_fails_for_training_and_test(bin_job: Path) -> None:
    (bin_job / "nlp-test-dataset.json").write_text('{"uid": "q"}')
    with pytest.raises(JobError, match="nlp-test-dataset.json: expected a JSON array of records, got dict"):
        load_job(bin_job)


def test_python_json_extensions_are_read_leniently(tmp_path: Path, caplog) -> None:
    label = "single_label_regression_target"
    job_dir = write_job(tmp_path, label_name=label, train=[], test=[])
    records = [f'{{"uid": "a", "text": "x", "{label}": 1.0}}', f'{{"uid": "b", "text": "y", "{label}": NaN}}']
    (job_dir / TRAIN_FILE).write_text("[" + ", ".join(records) + "]")
    (job_dir / "nlp-test-dataset.json").write_bytes(b'[{"uid": "q", "text": "lone \\ud800 surrogate \xff byte"}]')
    job = load_job(job_dir)
    assert [c.uid for c in job.train] == ["a"] and job.dropped == {"train": 1}
    orjson.dumps(job.test[0].text)  # every string encodes as UTF-8 again
    assert "not strict JSON" in caplog.text


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


def test_a_full_disk_is_one_error_naming_the_file_and_nothing_is_left(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    write_predictions([{"uid": "a", "x": 1.0}], out)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(JobError, match=rf"{PREDICTIONS_FILE}: cannot write \d+ bytes: .*\(ENOSPC\); nothing written"):
        write_predictions([{"uid": "b", "x": 2.0}], out)
    assert orjson.loads((out / PREDICTIONS_FILE).read_bytes()) == [{"uid": "a", "x": 1.0}]
    assert [p.name for p in out.iterdir()] == [PREDICTIONS_FILE]


def test_an_output_path_that_is_a_file_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file")
    with pytest.raises(JobError, match=r"out: the output path exists and is not a folder"):
        write_predictions([], tmp_path / "out")
    with pytest.raises(JobError, match=r"out/sub: cannot create the output folder: .*/out is a file"):
        atomic_write(tmp_path / "out" / "sub" / "f.json", b"{}")
