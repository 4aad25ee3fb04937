"""Shared fixtures: small DRAGON jobs written in tmp folders, the project's example jobs, the model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIXTURES = REPO / "test" / "fixtures"
JOBS = FIXTURES / "jobs"
GROUND_TRUTH = FIXTURES / "ground-truth"
SYNTHETIC = REPO.parent / "shared" / "data" / "dragon-synthetic"
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_job(
    folder: Path,
    *,
    label_name: str,
    train: list[dict[str, Any]],
    test: list[dict[str, Any]],
    input_name: str = "text",
    task_name: str = "Task999_unit_test",
    validation: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a DRAGON job folder from plain records."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "jobid": 9990,
        "task_name": task_name,
        "input_name": input_name,
        "label_name": label_name,
        "recommended_truncation_side": "left",
        "version": "1.0",
    }
    (folder / "nlp-task-configuration.json").write_bytes(orjson.dumps(config))
    (folder / "nlp-training-dataset.json").write_bytes(orjson.dumps(train))
    (folder / "nlp-validation-dataset.json").write_bytes(orjson.dumps(validation or []))
    (folder / "nlp-test-dataset.json").write_bytes(orjson.dumps(test))
    return folder


@pytest.fixture
def bin_job(tmp_path: Path) -> Path:
    label = "single_label_binary_classification_target"
    train = [{"uid": f"t{i}", "text": f"report {i}", label: i % 3 == 0} for i in range(9)]
    test = [{"uid": f"x{i}", "text": f"test report {i}"} for i in range(4)]
    return write_job(tmp_path / "job", label_name=label, train=train, test=test)


def model_available() -> bool:
    return DEFAULT_MODEL.is_file()


needs_model = pytest.mark.skipif(
    not model_available(), reason="default model missing: run scripts/fetch_default_model.sh"
)
needs_synthetic = pytest.mark.skipif(not SYNTHETIC.is_dir(), reason="../shared/data/dragon-synthetic not present")
