"""Command-line checks that need the pipeline to call extractor/preflight.py: a bad model file or
an output path that is a file fail in one line before the model is loaded (README, "Reliability")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_preflight import JOB, assert_one_line_failure, gguf_bytes, run_cli, write

from extractor.dragon_io import PREDICTIONS_FILE
from extractor.preflight import available_memory, read_gguf_header


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is a text file, not a model\n" * 100, "not a GGUF model file"),
        (gguf_bytes([("w", (1024, 1024), 0)])[:-4096], "truncated GGUF file"),
    ],
)
def test_cli_bad_model_file(tmp_path: Path, content: bytes, message: str) -> None:
    model = write(tmp_path / "broken.gguf", content)
    proc = run_cli(tmp_path, "--input", str(JOB), "--output", str(tmp_path / "out"), "--model", str(model))
    assert_one_line_failure(proc, str(model), message)
    assert not (tmp_path / "out" / PREDICTIONS_FILE).exists()


def test_cli_model_larger_than_memory(tmp_path: Path) -> None:
    memory = available_memory()
    if memory is None:
        pytest.skip("available memory unknown")
    n = (2 * memory) // 4 + 1  # an F32 tensor twice the memory, in a sparse file (no disk used)
    model = write(tmp_path / "huge.gguf", gguf_bytes([("w", (n,), 0)], data=False))  # the header alone
    os.truncate(model, model.stat().st_size + 4 * n)
    assert read_gguf_header(model).data_bytes == 4 * n
    proc = run_cli(tmp_path, "--input", str(JOB), "--output", str(tmp_path / "out"), "--model", str(model))
    assert_one_line_failure(proc, str(model), "do not fit")
    assert not (tmp_path / "out" / PREDICTIONS_FILE).exists()


def test_cli_output_path_is_a_file_fails_before_the_model_is_looked_up(tmp_path: Path) -> None:
    out = write(tmp_path / "out", b"not a folder")
    missing_model = tmp_path / "no-such-model.gguf"
    proc = run_cli(tmp_path, "--input", str(JOB), "--output", str(out), "--model", str(missing_model))
    assert_one_line_failure(proc, str(out), "not a folder")
    assert out.read_bytes() == b"not a folder"
