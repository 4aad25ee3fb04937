"""Environments fail in one line: model files, output folders, a full disk (README, "Reliability").

The unit tests build small GGUF files by hand; the command-line tests run `process.py` and check
exit code 1, exactly one error line naming the file, no traceback and no predictions file.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL, JOBS, REPO, needs_model

from extractor.dragon_io import PREDICTIONS_FILE, JobError
from extractor.preflight import (
    GGML_BLOCKS,
    available_memory,
    check_model_file,
    check_output_dir,
    read_gguf_header,
)

JOB = JOBS / "Task101_Example_sl_bin_clf-fold0"


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(
    tensors: list[tuple[str, tuple[int, ...], int]] = (("w", (8, 4), 0),),
    *,
    version: int = 3,
    alignment: int = 32,
    data: bool = True,
) -> bytes:
    """A GGUF file: one string and one array of metadata, then `tensors` (name, shape, ggml type)
    laid out one after the other, each padded to the alignment."""
    kv = _string("general.architecture") + struct.pack("<I", 8) + _string("llama")
    kv += _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + _string("a") + _string("b")
    kv += _string("general.alignment") + struct.pack("<II", 4, alignment)
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), 3) + kv
    offset, infos, blob = 0, b"", b""
    for name, shape, ggml_type in tensors:
        infos += _string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        infos += struct.pack("<IQ", ggml_type, offset)
        block, size = GGML_BLOCKS[ggml_type]
        n = -(-math.prod(shape) // block) * size
        padded = -(-n // alignment) * alignment
        if data:  # without data the sizes may be far larger than memory
            blob += b"\x01" * n + b"\x00" * (padded - n)
        offset += padded
    out = head + infos
    out += b"\x00" * (-len(out) % alignment)
    return out + (blob if data else b"")


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_a_valid_header_is_read(tmp_path: Path) -> None:
    content = gguf_bytes([("a", (64, 2), 0), ("b", (256, 3), 12)])
    header = check_model_file(write(tmp_path / "m.gguf", content), memory=1 << 30)
    assert (header.version, header.tensor_count, header.kv_count, header.alignment) == (3, 2, 3, 32)
    # 512 bytes of F32, then 3 blocks of Q4_K; the last tensor's padding is not needed
    assert header.data_bytes == 64 * 2 * 4 + 3 * 144 and header.expected_size == len(content) - 16


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"not a GGUF model file \(an empty file\)"),
        (b"<html>404 Not Found</html>", r"not a GGUF model file \(starts with b'<htm'"),
        (gguf_bytes(version=1), "GGUF version 1 is not supported"),
        (b"GGUF" + struct.pack(">IQQ", 3, 1, 0), "big-endian GGUF"),
        (gguf_bytes()[:40], "truncated GGUF file: the header runs past the end"),
        (
            gguf_bytes(data=False),
            r"truncated GGUF file: \d+ bytes, but its 1 tensors need \d+ \(128 bytes missing, 100% of the weights",
        ),
        (gguf_bytes(alignment=24), "alignment 24 is not a power of two"),
    ],
)
def test_unusable_model_files_are_one_line_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = write(tmp_path / "model.gguf", content)
    with pytest.raises(JobError, match=message) as err:
        check_model_file(path, memory=1 << 30)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_a_model_larger_than_memory_fails(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", gguf_bytes([("w", (1024, 1024), 0)]))  # 4 MiB of F32
    with pytest.raises(JobError, match=r"weights \(0.0 GiB\) do not fit in the 0.0 GiB of memory available"):
        check_model_file(path, memory=1 << 20)
    check_model_file(path, memory=1 << 20, gpu_memory=1 << 30)  # the layers go to the GPU
    with pytest.raises(JobError, match="of GPU or host memory"):
        check_model_file(path, memory=1 << 20, gpu_memory=2 << 20)


def test_split_models_need_every_part(tmp_path: Path) -> None:
    first = write(tmp_path / "m-00001-of-00002.gguf", gguf_bytes())
    with pytest.raises(JobError, match="split model is missing 1 of 2 parts: m-00002-of-00002.gguf"):
        check_model_file(first, memory=1 << 30)
    write(tmp_path / "m-00002-of-00002.gguf", gguf_bytes(data=False))
    with pytest.raises(JobError, match="m-00002-of-00002.gguf: truncated GGUF file"):
        check_model_file(first, memory=1 << 30)


def test_block_sizes_agree_with_ggml_orgs_gguf_package() -> None:
    constants = pytest.importorskip("gguf.constants")
    theirs = {int(k): v for k, v in constants.GGML_QUANT_SIZES.items()}
    differ = {t: (GGML_BLOCKS[t], theirs[t]) for t in GGML_BLOCKS.keys() & theirs.keys() if GGML_BLOCKS[t] != theirs[t]}
    assert differ == {9: ((32, 36), (32, 40))}  # Q8_1: ggml's own struct has half-precision scales
    assert set(theirs) <= set(GGML_BLOCKS)


def test_a_file_written_by_the_gguf_package_is_read(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("a", np.ones((3, 5), dtype=np.float32))
    writer.add_tensor("b", np.ones((7,), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_gguf_header(path)
    assert header.tensor_count == 2 and 0 <= path.stat().st_size - header.expected_size < header.alignment


@needs_model
def test_the_default_model_passes_and_a_cut_copy_does_not(tmp_path: Path) -> None:
    header = check_model_file(DEFAULT_MODEL)
    assert header.expected_size <= DEFAULT_MODEL.stat().st_size
    cut = tmp_path / "cut.gguf"
    with open(DEFAULT_MODEL, "rb") as src:
        cut.write_bytes(src.read(DEFAULT_MODEL.stat().st_size * 2 // 3))
    with pytest.raises(JobError, match=r"cut.gguf: truncated GGUF file: .*missing, 3\d% of the weights"):
        check_model_file(cut)


def test_available_memory_is_a_positive_number() -> None:
    memory = available_memory()
    assert memory is None or memory > 0


def test_output_folder_checks(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new" / "out")
    assert (tmp_path / "new" / "out").is_dir() and list((tmp_path / "new" / "out").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(JobError, match="file: the output path exists and is not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(JobError, match="file/out: cannot create the output folder: .*file is a file"):
        check_output_dir(tmp_path / "file" / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_output_folder_fails(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(JobError, match="ro: the output folder is not writable"):
            check_output_dir(folder)
    finally:
        folder.chmod(0o700)


# --- the command line: exit 1, one line, no traceback, no predictions -----------------------------


def run_cli(tmp_path: Path, *args: str, preexec=None, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "process.py", "--work-dir", str(tmp_path / "work"), "--log-level", "WARNING", *args]
    return subprocess.run(
        [*(wrap or []), *cmd], cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=preexec
    )


def assert_one_line_failure(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line or line.startswith("ERROR")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1))  # Python ignores SIGXFSZ: writes fail with EFBIG


def test_cli_write_failure_leaves_nothing(tmp_path: Path) -> None:
    """A file-size limit makes the predictions write fail as a full disk does (`--max-cases 0`:
    predictions without a model)."""
    out = tmp_path / "out"
    proc = run_cli(
        tmp_path,
        "--input",
        str(JOB),
        "--output",
        str(out),
        "--max-cases",
        "0",
        "--no-journal",
        preexec=_limit_file_size,
    )
    assert_one_line_failure(proc, str(out / PREDICTIONS_FILE), "cannot write", "nothing written")
    assert list(out.iterdir()) == []


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and mount namespaces for a small tmpfs")
def test_cli_full_disk_is_one_line_and_no_partial_file(tmp_path: Path) -> None:
    """A real ENOSPC: the output folder is a 4 KiB tmpfs, already full."""
    out = tmp_path / "out"
    out.mkdir()
    fill = f'mount -t tmpfs -o size=4k tmpfs {out} && head -c 4096 /dev/zero > {out}/filler && exec "$@"'
    proc = run_cli(
        tmp_path,
        "--input",
        str(JOB),
        "--output",
        str(out),
        "--max-cases",
        "0",
        wrap=["unshare", "-m", "--propagation", "private", "sh", "-c", fill, "sh"],
    )
    line = assert_one_line_failure(proc, str(out / PREDICTIONS_FILE), "No space left on device (ENOSPC)")
    assert "nothing written" in line
