"""Worked example adapter: a radiology report plus an image in, one JSON answer out.

The challenge (made up for docs/new-challenge.md) has two input sockets, the report as a String
value (`radiology-report`) and the image it was written about (`ct-image`), and one output
socket, `findings`: is the lesion the report describes consistent with the image (does the
image cover that body region, does the lesion fit in its field of view)?

The image itself never reaches the language model: its metadata does (modality and body-part
tags, voxel size, spacing, physical extent), rendered as text next to the report. Everything
after loading is the DRAGON pipeline unchanged: a single-label binary task whose Taskfile is
examples/report_image/taskfile.json, answered with a probability, written as
`{"consistent_with_image": bool, "probability": float}`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extractor.dragon_io import Case, Job, PredictionError, TaskConfig, verify_predictions
from extractor.gc_io import IMAGE_SUFFIXES, ImageData, Inputs, Socket, read_inputs, write_json

REPORT_SOCKET = Socket("radiology-report", "radiology-report.json", "Value", "String", "Radiology report")
IMAGE_SOCKET = Socket("ct-image", "images/ct", "Image", "Image", "CT image")
FINDINGS_SOCKET = Socket("findings", "findings.json", "Value", "Anything", "Findings")

TASK_NAME = "Example_report_image_consistency"
LABEL_NAME = "single_label_binary_classification_target"
ANSWER_FIELD = "consistent_with_image"

# Where the tags are found: DICOM keys (as SimpleITK names them) first, then MetaImage/panimg names.
MODALITY_KEYS = ("0008|0060", "Modality")
BODY_PART_KEYS = ("0018|0015", "BodyPartExamined")
DESCRIPTION_KEYS = ("0008|103e", "SeriesDescription", "0008|1030", "StudyDescription")


def _tag(image: ImageData, keys: Sequence[str]) -> str | None:
    for key in keys:
        value = str(image.metadata.get(key, "")).strip()
        if value.startswith("MET_MOD_"):  # MetaImage's own modality field
            value = value.removeprefix("MET_MOD_")
            value = "" if value == "UNKNOWN" else value
        if value:
            return value
    return None


def _numbers(values: Sequence[float], digits: int) -> str:
    return " x ".join(f"{v:.{digits}f}" for v in values)


def image_summary(image: ImageData) -> dict[str, Any]:
    """What the model is told about the image, as data."""
    axes = "xyz"[: image.dimension]
    return {
        "modality": _tag(image, MODALITY_KEYS),
        "body_part": _tag(image, BODY_PART_KEYS),
        "description": _tag(image, DESCRIPTION_KEYS),
        "size_voxels": list(image.size),
        "spacing_mm": [round(s, 4) for s in image.spacing],
        "extent_mm": [round(e, 1) for e in image.extent_mm],
        "axes": axes,
        "pixel_type": image.pixel_type,
    }


def describe_image(image: ImageData) -> str:
    """The image metadata as one line of text for the prompt."""
    info = image_summary(image)
    parts = [f"modality {info['modality'] or 'not stated'}", f"body part {info['body_part'] or 'not stated'}"]
    if info["description"]:
        parts.append(f"series description {info['description']!r}")
    axes = ", ".join(info["axes"])
    parts += [
        f"size {_numbers(info['size_voxels'], 0)} voxels ({axes})",
        f"spacing {_numbers(image.spacing, 2)} mm",
        f"field of view {_numbers(image.extent_mm, 1)} mm ({axes})",
    ]
    return "; ".join(parts)


def case_uid(path: Path) -> str:
    """The case id: the image file's name without its image suffix."""
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


class ReportImageAdapter:
    """Report (String socket) + image (Image socket) -> findings (JSON socket)."""

    name = "report-image"

    def __init__(
        self,
        report: Socket = REPORT_SOCKET,
        image: Socket = IMAGE_SOCKET,
        findings: Socket = FINDINGS_SOCKET,
        task_name: str = TASK_NAME,
    ) -> None:
        self.report, self.image, self.findings_socket, self.task_name = report, image, findings, task_name

    def _inputs(self, input_dir: Path) -> Inputs:
        # Without inputs.json (a hand-made local folder) the two sockets are assumed at their paths.
        return read_inputs(input_dir, known=(self.report, self.image))

    def load(self, input_dir: Path) -> Job:
        inputs = self._inputs(input_dir)
        report = inputs.text(self.report.slug)
        image_path = inputs.image_path(self.image.slug)
        image = inputs.image(self.image.slug)
        config = TaskConfig(
            task_name=self.task_name,
            input_name="text_parts",
            label_name=LABEL_NAME,
            recommended_truncation_side="right",  # a report too long for the context loses its end
        )
        case = Case(uid=case_uid(image_path), parts=(describe_image(image), report))
        return Job(config=config, train=(), validation=(), test=(case,), input_dir=Path(input_dir))

    def input_files(self, job: Job) -> Sequence[Path]:
        inputs = self._inputs(job.input_dir)
        return [inputs.path(self.report.slug), inputs.image_path(self.image.slug)]

    def findings(self, records: list[dict[str, Any]], job: Job) -> dict[str, Any]:
        """The output value: the one case's probability and the decision at 0.5."""
        key = job.task_type.prediction_key
        if len(records) != 1:
            raise PredictionError(f"socket {self.findings_socket.slug!r}: expected one prediction, got {len(records)}")
        probability = records[0][key]
        if not isinstance(probability, float) or not math.isfinite(probability) or not 0 <= probability <= 1:
            raise PredictionError(f"socket {self.findings_socket.slug!r}: expected a probability, got {probability!r}")
        return {ANSWER_FIELD: probability >= 0.5, "probability": probability}

    def verify(self, records: list[dict[str, Any]], job: Job) -> None:
        verify_predictions(records, job)
        self.findings(records, job)

    def write(self, records: list[dict[str, Any]], job: Job, output_dir: Path) -> list[Path]:
        return [write_json(output_dir, self.findings_socket, self.findings(records, job))]
