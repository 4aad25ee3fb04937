from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from conftest import REPO, write_job

from extractor.dragon_io import load_job
from extractor.taskfiles import (
    Taskfile,
    TaskfileError,
    derive_taskfile,
    load_taskfile,
    load_taskfiles,
    taskfile_for_job,
)

MC = "single_label_multi_class_classification_target"


def taskfile_dict(**over) -> dict:
    base = {
        "task_names": ["Task999_unit_test"],
        "label_name": MC,
        "instructions": "Pick the organ.",
        "fields": [{"name": "organ", "type": "label", "labels": ["lung", "liver"]}],
    }
    base.update(over)
    return base


def test_shipped_taskfiles_validate() -> None:
    taskfiles = load_taskfiles(REPO / "taskfiles")
    assert all(isinstance(tf, Taskfile) for tf in taskfiles.values())


@pytest.mark.parametrize(
    "over, message",
    [
        ({"fields": [{"name": "organ", "type": "boolean"}]}, "needs fields of type 'label'"),
        ({"fields": [{"name": "organ", "type": "label"}]}, "needs a non-empty 'labels'"),
        ({"fields": [{"name": "reasoning", "type": "label", "labels": ["a"]}]}, "not 'reasoning'"),
        ({"label_name": "named_entity_recognition_target"}, "entities"),
        ({"unknown_key": 1}, "Extra inputs"),
        ({"fields": [{"name": "bad name", "type": "label", "labels": ["a"]}]}, "pattern"),
    ],
)
def test_invalid_taskfiles_name_file_and_problem(tmp_path: Path, over: dict, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(taskfile_dict(**over)))
    with pytest.raises(TaskfileError, match=message) as info:
        load_taskfile(path)
    assert str(path) in str(info.value)


def test_a_task_served_twice_is_an_error(tmp_path: Path) -> None:
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_bytes(orjson.dumps(taskfile_dict()))
    with pytest.raises(TaskfileError, match="already served"):
        load_taskfiles(tmp_path)


def test_training_labels_win_and_the_log_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "tf").mkdir()
    (tmp_path / "tf" / "t.json").write_bytes(orjson.dumps(taskfile_dict()))
    train = [{"uid": str(i), "text": "x", MC: lab} for i, lab in enumerate(["lung", "bone", "bone"])]
    job = load_job(write_job(tmp_path / "job", label_name=MC, train=train, test=[]))
    with caplog.at_level(logging.WARNING):
        tf = taskfile_for_job(job.config, job.train, load_taskfiles(tmp_path / "tf"))
    assert tf.fields[0].labels == ("lung", "bone")
    assert "using the training labels" in caplog.text


@pytest.mark.parametrize(
    "label_name, label, input_name, expected_fields",
    [
        ("single_label_binary_classification_target", True, "text", ["boolean"]),
        ("multi_label_binary_classification_target", [True, False, True], "text", ["boolean"] * 3),
        ("multi_label_multi_class_classification_target", ["a", "b"], "text", ["label", "label"]),
        ("single_label_regression_target", 3.5, "text", ["number"]),
        ("multi_label_regression_target", [1.0, None], "text", ["number", "number"]),
        ("named_entity_recognition_target", ["B-X", "O"], "text_parts", ["entities"]),
    ],
)
def test_derived_taskfiles_fit_every_task_type(tmp_path, label_name, label, input_name, expected_fields) -> None:
    content = ["w1", "w2"] if input_name == "text_parts" else "report"
    train = [{"uid": "a", input_name: content, label_name: label}]
    job = load_job(write_job(tmp_path, label_name=label_name, input_name=input_name, train=train, test=[]))
    tf = taskfile_for_job(job.config, job.train, {})
    assert [f.type for f in tf.fields] == expected_fields
    assert "Derived" in tf.notes


def test_derived_multilabel_ner_reads_item_numbers(tmp_path: Path) -> None:
    label = "multi_label_named_entity_recognition_target"
    tags = [["O"], ["B-2-lesion"], ["I-2-lesion", "B-5-cyst"]]
    job = load_job(
        write_job(
            tmp_path,
            label_name=label,
            input_name="text_parts",
            train=[{"uid": "a", "text_parts": ["a", "b", "c"], label: tags}],
            test=[],
        )
    )
    tf = derive_taskfile(job.config, job.train)
    assert tf.ner is not None and tf.ner.numbered
    assert tf.ner.entity_types == ("cyst", "lesion")
    assert (tf.ner.item_min, tf.ner.item_max) == (2, 5)


def test_label_name_mismatch_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "tf").mkdir()
    (tmp_path / "tf" / "t.json").write_bytes(orjson.dumps(taskfile_dict()))
    label = "single_label_regression_target"
    job = load_job(
        write_job(tmp_path / "job", label_name=label, train=[{"uid": "a", "text": "x", label: 1.0}], test=[])
    )
    with pytest.raises(TaskfileError, match="label_name"):
        taskfile_for_job(job.config, job.train, load_taskfiles(tmp_path / "tf"))


def test_readme_lists_every_shipped_taskfile() -> None:
    readme = (REPO / "README.md").read_text()
    for name in load_taskfiles(REPO / "taskfiles"):
        assert f"| {name} |" in readme, f"{name} missing from the README's Taskfile table"


REG = "single_label_regression_target"
NER = "named_entity_recognition_target"


def test_median_missing_value_becomes_the_training_median(tmp_path: Path) -> None:
    (tmp_path / "tf").mkdir()
    field = {"name": "v", "type": "number", "nullable": True, "missing_value": "median"}
    tf_data = taskfile_dict(label_name=REG, fields=[field])
    (tmp_path / "tf" / "t.json").write_bytes(orjson.dumps(tf_data))
    train = [{"uid": str(i), "text": "x", REG: v} for i, v in enumerate([3.0, 10.0, 4.0, 100.0, 5.0])]
    job = load_job(write_job(tmp_path / "job", label_name=REG, train=train, test=[]))
    tf = taskfile_for_job(job.config, job.train, load_taskfiles(tmp_path / "tf"))
    assert tf.fields[0].missing_value == 5.0


def test_median_is_only_for_number_fields(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    field = {"name": "organ", "type": "label", "labels": ["a"], "missing_value": "median"}
    path.write_bytes(orjson.dumps(taskfile_dict(fields=[field])))
    with pytest.raises(TaskfileError, match="missing_value 'median' is for 'number' fields"):
        load_taskfile(path)


def ner_dict(**ner) -> dict:
    return taskfile_dict(
        label_name=NER,
        input={"kind": "words"},
        fields=[{"name": "entities", "type": "entities"}],
        ner={"entity_types": ["<A_B>"], "type_descriptions": {"<A_B>": "an a-b"}, **ner},
    )


def test_an_alias_must_name_a_described_type(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(ner_dict(type_aliases={"<A-B>": "<C>"})))
    with pytest.raises(TaskfileError, match="has no type_descriptions entry"):
        load_taskfile(path)


def test_training_spellings_take_their_aliases_descriptions_and_gaps_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "tf").mkdir()
    (tmp_path / "tf" / "t.json").write_bytes(orjson.dumps(ner_dict(type_aliases={"<A-B>": "<A_B>"})))
    words = ["w1", "w2", "w3"]
    train = [{"uid": "a", "text_parts": words, NER: ["B-<A-B>", "O", "B-<NEW>"]}]
    job = load_job(write_job(tmp_path / "job", label_name=NER, input_name="text_parts", train=train, test=[]))
    with caplog.at_level(logging.INFO):
        tf = taskfile_for_job(job.config, job.train, load_taskfiles(tmp_path / "tf"))
    assert tf.ner is not None and tf.ner.entity_types == ("<A-B>", "<NEW>")
    assert tf.ner.described_types() == [(("<A-B>",), "an a-b"), (("<NEW>",), None)]
    assert "training tags ['<NEW>'] have no description" in caplog.text


def test_label_descriptions_and_decisions_are_for_label_fields_only(tmp_path: Path) -> None:
    for extra in ({"label_descriptions": {"x": "y"}}, {"decision": "min_expected_cost"}):
        path = tmp_path / "bad.json"
        field = {"name": "v", "type": "number", **extra}
        path.write_bytes(orjson.dumps(taskfile_dict(label_name=REG, fields=[field])))
        with pytest.raises(TaskfileError, match="only 'label' fields take labels"):
            load_taskfile(path)
