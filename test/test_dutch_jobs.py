"""The 28 real DRAGON tasks as small Dutch jobs: Taskfiles, the oracle round trip and the real model."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import orjson
import pytest
from conftest import FIXTURES, REPO, needs_model

from extractor import evaluate
from extractor.dragon_io import load_job
from extractor.prompts import system_prompt
from extractor.taskfiles import NUMBERED_TAG, load_taskfiles, taskfile_for_job, training_tags
from extractor.tasktypes import ValueKind

DUTCH = FIXTURES / "dutch"
DUTCH_JOBS = DUTCH / "jobs"
DUTCH_GROUND_TRUTH = DUTCH / "ground-truth"
TASKFILES = REPO / "taskfiles"
TASK_NAMES = [f"Task{n:03d}" for n in range(1, 29)]
JOB_DIRS = sorted(DUTCH_JOBS.glob("Task0*-fold0"))


def table_rows(out: str) -> dict[str, str]:
    """Task name -> the score cell of evaluate's results table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("Task"):
            rows[cells[0]] = cells[4]
    return rows


def run_eval(capsys: pytest.CaptureFixture, out: Path, *args: str) -> tuple[int, str]:
    argv = ["--jobs", str(DUTCH_JOBS), "--ground-truth", str(DUTCH_GROUND_TRUTH), "--out", str(out), *args]
    code = evaluate.main(argv)
    return code, capsys.readouterr().out


def test_there_is_one_job_per_real_dragon_task() -> None:
    assert [d.name[:7] for d in JOB_DIRS] == TASK_NAMES
    assert sorted(p.stem[:7] for p in DUTCH_GROUND_TRUTH.glob("*.json")) == TASK_NAMES


@pytest.mark.parametrize("job_dir", JOB_DIRS, ids=lambda d: d.name[:7])
def test_job_loads_and_fits_its_taskfile(job_dir: Path) -> None:
    """Spellings, list lengths and NER tags as the Taskfile declares; test labels seen in training."""
    job = load_job(job_dir)
    taskfiles = load_taskfiles(TASKFILES)
    name = job.config.task_name
    assert job_dir.name == f"{name}-fold0" and job.config.jobid == int(name[4:7]) * 10
    assert name in taskfiles, f"no Taskfile serves {name}"
    declared = taskfiles[name]
    tf = taskfile_for_job(job.config, job.train, taskfiles)
    assert 4 <= len(job.train) <= 6 and len(job.validation) == 1 and len(job.test) == 2
    ttype = job.task_type
    labelled = job.train + job.validation
    uids = [c.uid for c in labelled + job.test]
    assert len(set(uids)) == len(uids)
    truth = orjson.loads((DUTCH_GROUND_TRUTH / f"{name}.json").read_bytes())
    assert [r["uid"] for r in truth] == [c.uid for c in job.test]
    test_labels = [r[job.config.label_name] for r in truth]
    assert test_labels[0] != test_labels[1]
    if ttype.is_ner:
        assert declared.ner is not None and tf.ner is not None
        for label in [c.label for c in labelled] + test_labels:
            for word_tags in label:
                for tag in word_tags if ttype.multi else [word_tags]:
                    if tag == "O":
                        continue
                    kind = tag[2:]
                    if declared.ner.numbered:
                        m = NUMBERED_TAG.match(kind)
                        assert m and declared.ner.item_min <= int(m.group(1)) <= declared.ner.item_max, tag
                        assert tf.ner.item_min <= int(m.group(1)) <= tf.ner.item_max, f"{tag}: item not in training"
                        kind = m.group(2)
                    assert kind in declared.ner.entity_types, tag
                    assert kind in tf.ner.entity_types, f"{tag}: type not seen in training"
        return
    width = len(declared.fields)
    for label in [c.label for c in labelled] + test_labels:
        values = label if ttype.multi else [label]
        assert len(values) == width
        for field, value in zip(declared.fields, values, strict=True):
            if ttype.kind is ValueKind.CLASS:
                assert value in (field.labels or ()), f"{field.name}: {value!r}"
    if ttype.kind is ValueKind.CLASS:
        for i, field in enumerate(tf.fields):
            for label in test_labels:
                value = label[i] if ttype.multi else label
                assert value in (field.labels or ()), f"{field.name}: test label {value!r} not in training"
    if ttype.kind is ValueKind.BINARY and ttype.multi:
        if name == "Task015_colon_pathology_clf":  # mean of per-label AUCs: every column needs both classes
            assert all(a != b for a, b in zip(*test_labels, strict=True))
        else:
            assert {v for label in test_labels for v in label} == {True, False}
    if ttype.kind is ValueKind.NUMBER and not ttype.multi:
        assert all(isinstance(v, float) for v in test_labels)


def prompt_section(prompt: str, title: str) -> list[str]:
    """The lines of one '<title>:' block of a system prompt, up to the blank line after it."""
    lines = prompt.splitlines()
    start = lines.index(f"{title}:") + 1
    end = lines.index("", start)
    return lines[start:end]


@pytest.mark.parametrize("job_dir", JOB_DIRS, ids=lambda d: d.name[:7])
def test_prompt_describes_every_training_tag_and_no_absent_one(job_dir: Path) -> None:
    """The prompt, rendered from the job's fitted Taskfile, gives every training tag (NER types,
    or labels of fields with label descriptions) a description, and describes nothing else."""
    job = load_job(job_dir)
    declared = load_taskfiles(TASKFILES)[job.config.task_name]
    tf = taskfile_for_job(job.config, job.train, load_taskfiles(TASKFILES))
    prompt = system_prompt(tf, reasoning=True)
    if tf.ner is not None:
        seen = {NUMBERED_TAG.sub(r"\2", tag) for tag in training_tags(job.train, job.task_type)}
        assert set(tf.ner.entity_types) == seen
        if not declared.ner.type_descriptions:
            return
        described: set[str] = set()
        for line in prompt_section(prompt, "Entity types"):
            names, _, desc = line.removeprefix("- ").partition(": ")
            tags = set(names.split(" (")[0].split(" or "))
            assert desc, f"{sorted(tags)} without a description"
            described |= tags
        assert described == seen, f"described {sorted(described)}, training tags {sorted(seen)}"
        for key, desc in declared.ner.type_descriptions.items():
            if key not in {tf.ner.canonical(t) for t in seen}:
                assert desc not in prompt, f"{key}: described but absent from training"
        return
    for field in tf.fields:
        if not field.label_descriptions:
            continue
        for label in field.labels or ():
            assert f"  - {orjson.dumps(label).decode()}: " in prompt, f"{field.name}: {label!r} not described"
        for label, desc in field.label_descriptions.items():
            if label not in (field.labels or ()):
                assert f"  - {orjson.dumps(label).decode()}: {desc}" not in prompt, f"{label!r} absent but described"


def test_oracle_scores_one_on_every_dutch_task(tmp_path: Path, capsys) -> None:
    code, out = run_eval(capsys, tmp_path, "--backend", "oracle")
    assert code == 0, out
    rows = table_rows(out)
    assert sorted(t[:7] for t in rows) == TASK_NAMES, out
    assert all(cell == "1.000" for cell in rows.values()), out
    assert out.strip().splitlines()[-1] == "overall 1.0000"


@needs_model
@pytest.mark.model
def test_default_model_scores_every_dutch_task_with_dragon_eval(tmp_path: Path, capsys) -> None:
    """All 28 tasks through the real model (both test cases: AUROC needs both classes).

    Reasoning off and a capped output budget keep the 56 reports within CI's time; the point is
    that every task runs end to end and scores, not the small model's accuracy. Its own work dir, so
    no checkpoint journal of an earlier run (default <temp dir>/dragon-extractor) answers for the model."""
    code, out = run_eval(
        capsys,
        tmp_path,
        *("--reasoning", "off", "--max-output-tokens", "192", "--k", "1", "--work-dir", str(tmp_path / "work")),
    )
    assert code == 0, out
    rows = table_rows(out)
    assert sorted(t[:7] for t in rows) == TASK_NAMES, out
    assert all(re.fullmatch(r"-?\d+\.\d{3}", cell) for cell in rows.values()), out
    assert "error" not in out
    assert out.strip().splitlines()[-1].startswith("overall ")


def test_dutch_fixture_files_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("make_dutch_jobs", FIXTURES / "make_dutch_jobs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.expected_files()
    assert len(expected) == 28 * 5
    for path, data in expected.items():
        assert path.read_bytes() == data, f"{path} is stale: run python test/fixtures/make_dutch_jobs.py"
    written = {p for p in DUTCH.rglob("*") if p.is_file()}
    assert written == set(expected), f"unexpected files: {sorted(written - set(expected))}"
