"""Adapters: the worked report-plus-image example end to end, and DRAGON unchanged through its adapter."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson
import pytest
from conftest import GROUND_TRUTH, JOBS, REPO, needs_model

import process
from extractor.adapters import Adapter, DragonAdapter
from extractor.adapters.dragon import PREDICTIONS_SOCKET, TEST_SOCKET, TRAIN_SOCKET, resolve_dragon_files
from extractor.adapters.report_image import FINDINGS_SOCKET, LABEL_NAME, ReportImageAdapter, describe_image
from extractor.backend import PlainTokenizer, Request, Result
from extractor.dragon_io import PREDICTIONS_FILE, JobError, PredictionError, load_job, write_predictions
from extractor.gc_io import INPUTS_JSON, Socket, inputs_json, load_image
from extractor.generation import answer_cases
from extractor.pipeline import predictions
from extractor.prior import TrainingPrior
from extractor.prompts import PromptBuilder
from extractor.settings import parse_settings
from extractor.taskfiles import load_taskfiles, taskfile_for_job

EXAMPLE = REPO / "examples" / "report_image"
DRAGON_JOB = JOBS / "Task101_Example_sl_bin_clf-fold0"
DRAGON_TRUTH = GROUND_TRUTH / "Task101_Example_sl_bin_clf.json"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_example = _load("report_image_run", EXAMPLE / "run.py")
make_input = _load("report_image_make_input", EXAMPLE / "make_input.py").make_input

CHEST_REPORT = "CT thorax. Solid nodule of 14 mm in the right upper lobe. Conclusion: pulmonary nodule."
BRAIN_REPORT = "Enhancing lesion of 3 cm in the left frontal lobe of the brain with surrounding oedema."


def _truth(path: Path, uid: str, value: bool) -> Path:
    path.write_bytes(orjson.dumps([{"uid": uid, LABEL_NAME: value}]))
    return path


def _findings(out: Path) -> dict:
    return orjson.loads((out / FINDINGS_SOCKET.relative_path).read_bytes())


def test_adapters_follow_the_protocol() -> None:
    assert isinstance(DragonAdapter(), Adapter) and isinstance(ReportImageAdapter(), Adapter)


# -- the worked example ---------------------------------------------------------------------------


def test_report_image_job_carries_report_and_image_metadata(tmp_path: Path) -> None:
    make_input(tmp_path / "in", report=CHEST_REPORT, uid="case-7", body_part="CHEST", suffix=".nii.gz")
    job = ReportImageAdapter().load(tmp_path / "in")
    assert job.config.task_name == "Example_report_image_consistency" and job.train == ()
    (case,) = job.test
    assert case.uid == "case-7" and case.parts[1] == CHEST_REPORT
    metadata = case.parts[0]
    assert "modality not stated" in metadata and "body part not stated" in metadata  # NIfTI keeps no tags
    assert "size 48 x 40 x 24 voxels" in metadata and "field of view 38.4 x 32.0 x 60.0 mm" in metadata
    files = ReportImageAdapter().input_files(job)
    assert [f.name for f in files] == ["radiology-report.json", "case-7.nii.gz"]


@pytest.mark.parametrize(("report", "truth"), [(CHEST_REPORT, True), (BRAIN_REPORT, False)])
def test_report_image_end_to_end_with_the_oracle(tmp_path: Path, report: str, truth: bool) -> None:
    make_input(tmp_path / "in", report=report, uid="case-1")
    gt = _truth(tmp_path / "gt.json", "case-1", truth)
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--output", str(out), "--backend", "oracle", "--ground-truth", str(gt)]
    assert run_example.main(args) == 0
    assert _findings(out) == {"consistent_with_image": truth, "probability": 1.0 if truth else 0.0}
    assert sorted(p.name for p in out.iterdir()) == ["findings.json"]


def test_report_image_runs_without_inputs_json(tmp_path: Path) -> None:
    make_input(tmp_path / "in", uid="case-2")
    (tmp_path / "in" / INPUTS_JSON).unlink()  # a hand-made local folder: the known socket paths
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--taskfiles", str(EXAMPLE)]
    settings = parse_settings(args)
    summary = run_example.run_adapter(ReportImageAdapter(), settings, backend="prior")
    assert summary.predictions == str(tmp_path / "out" / "findings.json")
    assert _findings(tmp_path / "out") == {"consistent_with_image": True, "probability": 0.5}  # the fallback


def test_report_image_missing_image_socket_fails_cleanly(tmp_path: Path, caplog) -> None:
    make_input(tmp_path / "in")
    manifest = orjson.loads((tmp_path / "in" / INPUTS_JSON).read_bytes())
    (tmp_path / "in" / INPUTS_JSON).write_bytes(orjson.dumps(manifest[:1]))
    code = run_example.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--backend", "prior"])
    assert code == 1 and "no input socket 'ct-image'" in caplog.text
    assert not (tmp_path / "out").exists()


class Scripted:
    """A backend that checks what the model is shown and answers like the engine does."""

    name = "scripted"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def generate(self, requests: Sequence[Request]) -> Iterator[Result]:
        for req in requests:
            self.prompts.append(req.prompt)
            yield Result(
                uid=req.uid,
                text='{"consistent_with_image": false}',
                likelihoods={"consistent_with_image": {"true": -2.0, "false": -0.2}},
            )


def test_report_image_with_a_scripted_backend_through_the_pipeline_pieces(tmp_path: Path) -> None:
    make_input(tmp_path / "in", report=BRAIN_REPORT, uid="case-3", body_part="CHEST")
    adapter = ReportImageAdapter()
    job = adapter.load(tmp_path / "in")
    tf = taskfile_for_job(job.config, job.train, load_taskfiles(EXAMPLE))
    builder = PromptBuilder(tf, PlainTokenizer(), truncation_side="right", context_limit=8192)
    backend = Scripted()
    answers, stats = answer_cases(job.test, builder, backend)
    assert stats.answered == 1
    (prompt,) = backend.prompts
    assert "Image metadata: modality CT; body part CHEST" in prompt and f"Radiology report: {BRAIN_REPORT}" in prompt
    records = predictions(
        job.test, tf, job.task_type.prediction_key, answers, TrainingPrior(job.train, job.task_type), 0.0
    )
    adapter.verify(records, job)
    (path,) = adapter.write(records, job, tmp_path / "out")
    assert path == tmp_path / "out" / "findings.json"
    findings = _findings(tmp_path / "out")
    assert findings["consistent_with_image"] is False and findings["probability"] == pytest.approx(0.1418, abs=1e-3)


def test_report_image_refuses_predictions_it_cannot_write(tmp_path: Path) -> None:
    make_input(tmp_path / "in", uid="case-4")
    adapter = ReportImageAdapter()
    job = adapter.load(tmp_path / "in")
    with pytest.raises(PredictionError):
        adapter.verify([{"uid": "case-4", "single_label_binary_classification": 1.5}], job)
    with pytest.raises(PredictionError, match="expected one prediction"):
        adapter.findings([], job)


def test_describe_image_reads_metainfo_modality_and_missing_tags(tmp_path: Path) -> None:
    image_path = make_input(tmp_path / "in", body_part="")
    image = load_image(image_path)
    text = describe_image(image)
    assert "modality CT" in text and "body part not stated" in text


@needs_model
def test_report_image_end_to_end_with_the_default_model(tmp_path: Path) -> None:
    make_input(tmp_path / "in", report=CHEST_REPORT, uid="case-5")
    out = tmp_path / "out"
    # One thread: llama.cpp's spinning workers slow down many times on a busy machine.
    args = ["--input", str(tmp_path / "in"), "--output", str(out), "--summary", str(tmp_path / "s"), "--threads", "1"]
    assert run_example.main(args) == 0
    findings = _findings(out)
    assert set(findings) == {"consistent_with_image", "probability"}
    probability = findings["probability"]
    assert 0.0 <= probability <= 1.0 and findings["consistent_with_image"] == (probability >= 0.5)
    summary = orjson.loads((tmp_path / "s").read_bytes())
    assert summary["answered"] == 1 and summary["output_tokens"] > 0 and summary["model"].endswith(".gguf")


# -- DRAGON through its adapter ---------------------------------------------------------------------


def _settings(job: Path, out: Path, work: Path):
    return parse_settings(["--input", str(job), "--output", str(out), "--work-dir", str(work), "--no-journal"])


@pytest.mark.parametrize("backend", ["oracle", "knn"])
def test_dragon_adapter_writes_what_process_writes(tmp_path: Path, backend: str) -> None:
    process.run_job(_settings(DRAGON_JOB, tmp_path / "a", tmp_path / "w"), backend=backend, ground_truth=DRAGON_TRUTH)
    settings = _settings(DRAGON_JOB, tmp_path / "b", tmp_path / "w")
    summary = run_example.run_adapter(DragonAdapter(), settings, backend=backend, ground_truth=DRAGON_TRUTH)
    expected = (tmp_path / "a" / PREDICTIONS_FILE).read_bytes()
    assert (tmp_path / "b" / PREDICTIONS_FILE).read_bytes() == expected
    assert summary.predictions == str(tmp_path / "b" / PREDICTIONS_FILE)


def test_dragon_adapter_is_dragon_io_unchanged(tmp_path: Path) -> None:
    adapter = DragonAdapter()
    job = adapter.load(DRAGON_JOB)
    assert job == load_job(DRAGON_JOB)
    assert [p.name for p in adapter.input_files(job)] == [
        "nlp-task-configuration.json",
        "nlp-training-dataset.json",
        "nlp-test-dataset.json",
    ]
    records = [{"uid": c.uid, "single_label_binary_classification": 0.25} for c in job.test]
    adapter.verify(records, job)
    (path,) = adapter.write(records, job, tmp_path / "a")
    assert path == tmp_path / "a" / PREDICTIONS_SOCKET.relative_path
    assert path.read_bytes() == write_predictions(records, tmp_path / "b").read_bytes()


def _dragon_inputs_json(folder: Path, sockets: Sequence[Socket]) -> None:
    (folder / INPUTS_JSON).write_bytes(orjson.dumps(inputs_json([(s, None) for s in sockets])))


def test_dragon_adapter_finds_its_files_through_inputs_json(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    shutil.copytree(DRAGON_JOB, job_dir)
    sockets = [
        Socket("nlp-task-configuration", "config/task.json", "File", "Anything"),
        Socket("nlp-training-dataset", "data/train.json", "File", "Anything"),
        Socket("nlp-test-dataset", "data/test.json", "File", "Anything"),
    ]
    for socket in sockets:  # DRAGON's files are named after their slugs
        (job_dir / socket.relative_path).parent.mkdir(parents=True, exist_ok=True)
        (job_dir / f"{socket.slug}.json").rename(job_dir / socket.relative_path)
    (job_dir / "nlp-validation-dataset.json").unlink()  # optional: not listed
    _dragon_inputs_json(job_dir, sockets)
    files = resolve_dragon_files(job_dir)
    assert files["nlp-training-dataset.json"] == job_dir / "data" / "train.json"
    job = DragonAdapter().load(job_dir)
    reference = load_job(DRAGON_JOB)
    assert (job.config, job.train, job.test) == (reference.config, reference.train, reference.test)
    settings = _settings(job_dir, tmp_path / "out", tmp_path / "w")
    run_example.run_adapter(DragonAdapter(), settings, backend="oracle", ground_truth=DRAGON_TRUTH)
    process.run_job(
        _settings(DRAGON_JOB, tmp_path / "ref", tmp_path / "w"), backend="oracle", ground_truth=DRAGON_TRUTH
    )
    assert (tmp_path / "out" / PREDICTIONS_FILE).read_bytes() == (tmp_path / "ref" / PREDICTIONS_FILE).read_bytes()


def test_dragon_adapter_with_inputs_json_at_the_known_names_reads_the_folder_itself(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    shutil.copytree(DRAGON_JOB, job_dir)
    _dragon_inputs_json(
        job_dir, [TRAIN_SOCKET, TEST_SOCKET, Socket("nlp-task-configuration", "nlp-task-configuration.json", "File")]
    )
    assert DragonAdapter().load(job_dir).input_dir == job_dir


def test_dragon_adapter_names_a_missing_socket(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    shutil.copytree(DRAGON_JOB, job_dir)
    (job_dir / "nlp-test-dataset.json").unlink()
    _dragon_inputs_json(job_dir, [TRAIN_SOCKET])
    with pytest.raises(JobError) as err:  # process.py's exit 1, as for any unusable DRAGON input
        DragonAdapter().load(job_dir)
    message = str(err.value)
    assert str(job_dir / "nlp-test-dataset.json") in message and "'nlp-test-dataset'" in message
    assert "inputs.json lists nlp-training-dataset" in message


def test_dragon_adapter_reads_the_known_names_whatever_inputs_json_says(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    shutil.copytree(DRAGON_JOB, job_dir)
    _dragon_inputs_json(job_dir, [Socket("some-other-socket", "other.json", "Value")])
    assert DragonAdapter().load(job_dir) == load_job(job_dir)
    (job_dir / INPUTS_JSON).write_text('{"not": "a list"}')
    assert DragonAdapter().load(job_dir) == load_job(job_dir)
