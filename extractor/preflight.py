"""Checks of the environment before any work: the model file and the output folder.

Each failure is a `JobError` whose one-line message names the file and what is wrong with it, so
a job ends with exit 1 and that line instead of a traceback from llama.cpp or the file system
minutes later. The model check reads only the GGUF header (magic, version, counts, metadata and
tensor table), never the weights: it costs milliseconds even for a 20 GB file.
"""

from __future__ import annotations

import os
import resource
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from extractor.dragon_io import JobError, ensure_folder
from extractor.settings import SPLIT_PART

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS


# GGUF metadata value types: fixed sizes in bytes; 8 is a string, 9 an array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4

# ggml tensor types: (elements per block, bytes per block), as ggml.c's type_traits give them.
# A test compares this table with the one of ggml-org's `gguf` package.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1 (ggml's block is two halves and 32 bytes; gguf-py lists 40, float scales)
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}


@dataclass(frozen=True)
class GgufHeader:
    """What the header of one GGUF file says."""

    version: int
    tensor_count: int
    kv_count: int
    alignment: int
    data_offset: int  # where the tensor data starts
    expected_size: int  # the smallest file size that holds every tensor the header lists

    @property
    def data_bytes(self) -> int:
        return self.expected_size - self.data_offset


class _Truncated(Exception):
    pass


class _Reader:
    """Little-endian reads from a window of the file, refilled as parsing moves on; a length
    field pointing past the end of the file raises _Truncated before anything that large is read."""

    CHUNK = 1 << 23

    def __init__(self, fh: BinaryIO, size: int, start: int) -> None:
        self.fh, self.size = fh, size
        self.base, self.buf, self.off = start, b"", 0  # buf holds the file from `base` on

    @property
    def pos(self) -> int:
        return self.base + self.off

    def _window(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        if self.off + n > len(self.buf):
            self.base, self.off = self.pos, 0
            self.fh.seek(self.base)
            self.buf = self.fh.read(max(n, self.CHUNK))

    def read(self, n: int) -> bytes:
        self._window(n)
        out = self.buf[self.off : self.off + n]
        self.off += n
        return out

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        self.off += n  # past the window: the next read refills from the new position

    def u32(self) -> int:
        self._window(4)
        (value,) = struct.unpack_from("<I", self.buf, self.off)
        self.off += 4
        return value

    def u64(self) -> int:
        self._window(8)
        (value,) = struct.unpack_from("<Q", self.buf, self.off)
        self.off += 8
        return value

    def string(self) -> bytes:
        return self.read(self.u64())

    def skip_value(self, vtype: int) -> None:
        if vtype in _FIXED:
            self.skip(_FIXED[vtype])
        elif vtype == _STRING:
            self.skip(self.u64())
        elif vtype == _ARRAY:
            item, count = self.u32(), self.u64()
            if item in _FIXED:
                self.skip(_FIXED[item] * count)
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            raise ValueError(f"unknown metadata value type {vtype}")


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse one GGUF file's header and tensor table; JobError when it is not a usable GGUF."""
    path = Path(path)
    try:
        size = path.stat().st_size
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as err:
        raise JobError(f"{path}: cannot read the model file: {err.strerror or err}") from None
    with fh:
        magic = fh.read(4)
        if magic != GGUF_MAGIC:
            what = "an empty file" if size == 0 else f"starts with {magic!r}, not {GGUF_MAGIC!r}"
            raise JobError(f"{path}: not a GGUF model file ({what})")
        reader = _Reader(fh, size, start=4)
        try:
            version = reader.u32()
            if version not in SUPPORTED_VERSIONS:
                if version > 0xFFFF and struct.unpack(">I", struct.pack("<I", version))[0] in SUPPORTED_VERSIONS:
                    raise JobError(f"{path}: a big-endian GGUF file; llama.cpp here reads little-endian ones")
                raise JobError(
                    f"{path}: GGUF version {version} is not supported (llama.cpp reads versions "
                    f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
                )
            tensor_count, kv_count = reader.u64(), reader.u64()
            alignment = DEFAULT_ALIGNMENT
            for _ in range(kv_count):
                key = reader.string()
                vtype = reader.u32()
                if key == b"general.alignment" and vtype == _UINT32:
                    alignment = reader.u32()
                else:
                    reader.skip_value(vtype)
            if alignment <= 0 or alignment & (alignment - 1):
                raise JobError(f"{path}: corrupt GGUF header: alignment {alignment} is not a power of two")
            end = 0
            for _ in range(tensor_count):
                name = reader.string()
                n_dims = reader.u32()
                if n_dims > MAX_DIMS:
                    raise JobError(f"{path}: corrupt GGUF header: tensor {name[:60]!r} has {n_dims} dimensions")
                elements = 1
                for _ in range(n_dims):
                    elements *= reader.u64()
                ggml_type, offset = reader.u32(), reader.u64()
                block, nbytes = GGML_BLOCKS.get(ggml_type, (1, 0))  # an unknown type: at least its offset
                end = max(end, offset + -(-elements // block) * nbytes)
        except _Truncated:
            raise JobError(
                f"{path}: truncated GGUF file: the header runs past the end of the file ({size} bytes)"
            ) from None
        except ValueError as err:
            raise JobError(f"{path}: corrupt GGUF header: {err}") from None
        data_offset = -(-reader.pos // alignment) * alignment
    header = GgufHeader(version, tensor_count, kv_count, alignment, data_offset, data_offset + end)
    if size < header.expected_size:
        missing = header.expected_size - size
        raise JobError(
            f"{path}: truncated GGUF file: {size} bytes, but its {tensor_count} tensors need "
            f"{header.expected_size} ({missing} bytes missing, {100 * missing / max(header.data_bytes, 1):.0f}% of "
            "the weights; copy or download it again)"
        )
    return header


def model_parts(path: Path) -> list[Path]:
    """The files of one model: a split GGUF (`name-00001-of-00003.gguf`) is all its parts."""
    path = Path(path)
    m = SPLIT_PART.match(path.name)
    if not m:
        return [path]
    total = int(m.group("total"))
    parts = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise JobError(f"{path}: split model is missing {len(missing)} of {total} parts: {', '.join(missing[:3])}")
    return parts


def available_memory() -> int | None:
    """Bytes this process can still use: the least of the RAM available, the container's (cgroup)
    memory limit less its use, and the address-space limit; None when none is known."""
    limits: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) << 10)
    except (OSError, ValueError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                limits.append(int(limit) - int(Path(usage_file).read_text().strip()))
                break
        except (OSError, ValueError):
            continue
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return max(min(limits), 0) if limits else None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_model_file(path: Path, *, memory: int | None = None, gpu_memory: int | None = None) -> GgufHeader:
    """Fail in one line, before llama.cpp sees it, on a model file that is not a GGUF, has an
    unsupported version, is truncated (shorter than its tensor table says) or whose weights do not
    fit in memory: `memory` (default: `available_memory()`) or, when the layers go to a GPU,
    `gpu_memory` free there, whichever is larger. Returns the (first part's) header."""
    parts = model_parts(path)
    headers = [read_gguf_header(p) for p in parts]
    weights = sum(h.data_bytes for h in headers)
    memory = available_memory() if memory is None else memory
    room = max(memory or 0, gpu_memory or 0)
    if (memory is not None or gpu_memory is not None) and weights > room:
        where = "GPU or host memory" if gpu_memory is not None else "memory"
        raise JobError(
            f"{path}: the model's weights ({_gib(weights)}) do not fit in the {_gib(room)} of {where} "
            "available; use a smaller (or more strongly quantised) model or give the job more memory"
        )
    return headers[0]


def check_output_dir(path: Path) -> None:
    """Fail in one line unless `path` is (or can be created as) a folder this process can write to;
    creates it, and leaves nothing else in it."""
    path = Path(path)
    ensure_folder(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise JobError(f"{path}: the output folder is not writable: {err.strerror or err}") from None
