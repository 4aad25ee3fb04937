"""The DRAGON benchmark as an adapter: its four JSON input sockets in, one predictions file out.

A thin wrapper: reading, verifying and writing are `extractor.dragon_io` unchanged, so a job run
through this adapter writes byte for byte what process.py writes. The only addition is the
socket lookup: with `/input/inputs.json` the files are found by their socket slugs; without it
(as DRAGON jobs arrive in this repository's fixtures), or for a socket it does not list, the
known DRAGON file names are read.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extractor.dragon_io import (
    CONFIG_FILE,
    PREDICTIONS_FILE,
    TEST_FILE,
    TRAIN_FILE,
    VALIDATION_FILE,
    Job,
    JobError,
    load_job,
    verify_predictions,
    write_predictions,
)
from extractor.gc_io import INPUTS_JSON, Socket, SocketError, read_inputs

log = logging.getLogger(__name__)

# The DRAGON sockets: slug = file name without `.json` (the DRAGON archive-upload scripts name
# the files f"{slug}.json"). The validation set is optional.
CONFIG_SOCKET = Socket("nlp-task-configuration", CONFIG_FILE, "File", "Anything")
TRAIN_SOCKET = Socket("nlp-training-dataset", TRAIN_FILE, "File", "Anything")
VALIDATION_SOCKET = Socket("nlp-validation-dataset", VALIDATION_FILE, "File", "Anything")
TEST_SOCKET = Socket("nlp-test-dataset", TEST_FILE, "File", "Anything")
PREDICTIONS_SOCKET = Socket("nlp-predictions-dataset", PREDICTIONS_FILE, "File", "Anything")
INPUT_SOCKETS = (CONFIG_SOCKET, TRAIN_SOCKET, VALIDATION_SOCKET, TEST_SOCKET)
REQUIRED = (CONFIG_SOCKET, TRAIN_SOCKET, TEST_SOCKET)


def resolve_dragon_files(input_dir: Path) -> dict[str, Path]:
    """Known DRAGON file name -> the file that holds it.

    A socket listed in inputs.json is read from its relative path; a socket inputs.json does not
    list (or every socket, without inputs.json) from its known file name, so a job whose
    inputs.json names other slugs still reads as before. A missing validation set is left out
    (it is optional); a missing required file is an error naming inputs.json, the slug and the
    file looked for. An inputs.json that cannot be read is logged and the known names are used."""
    input_dir = Path(input_dir)
    manifest = input_dir / INPUTS_JSON
    inputs = None
    if manifest.is_file():
        try:
            inputs = read_inputs(input_dir)
        except SocketError as err:  # never worse than before inputs.json was read
            log.warning("%s; reading the known DRAGON file names instead", err)
    files: dict[str, Path] = {}
    for socket in INPUT_SOCKETS:
        known = input_dir / socket.relative_path
        if inputs is not None and socket.slug in inputs:
            path = inputs.path(socket.slug)
            if inputs.socket(socket.slug).is_image:
                raise SocketError(f"{path}: socket {socket.slug!r}: expected a JSON file, not an image")
            if not path.is_file():
                raise SocketError(f"{path}: missing file for socket {socket.slug!r} (listed in {manifest})")
            files[socket.relative_path] = path
        elif known.is_file():
            if inputs is not None:
                log.info("%s lists no socket %r; reading %s", manifest, socket.slug, known)
            files[socket.relative_path] = known
        elif socket in REQUIRED:
            if inputs is not None:
                listed = f"{manifest} lists {', '.join(inputs.slugs) or 'no sockets'}"
            else:
                listed = f"{manifest} unreadable" if manifest.is_file() else f"no {manifest}"
            raise SocketError(
                f"{known}: missing input file for socket {socket.slug!r} ({listed}); "
                f"DRAGON needs {', '.join(s.slug for s in REQUIRED)}"
            )
    return files


def staged_input_dir(input_dir: Path) -> Path:
    """The folder to hand to `dragon_io.load_job`: the input folder itself when every socket sits
    at its known file name (always so for DRAGON), else a temporary folder of links under the
    known names (a few symbolic links, left for the process's lifetime)."""
    input_dir = Path(input_dir)
    files = resolve_dragon_files(input_dir)
    if all(path == input_dir / name for name, path in files.items()):
        return input_dir
    staged = Path(tempfile.mkdtemp(prefix="dragon-sockets-"))
    for name, path in files.items():
        (staged / name).symlink_to(path.resolve())
        log.info("socket file %s read as %s", path, name)
    return staged


class DragonAdapter:
    """DRAGON: `nlp-*-dataset` and `nlp-task-configuration` in, `nlp-predictions-dataset` out."""

    name = "dragon"

    def load(self, input_dir: Path) -> Job:
        input_dir = Path(input_dir)
        if not (input_dir / INPUTS_JSON).is_file():
            return load_job(input_dir)  # today's DRAGON jobs: exactly process.py's call
        try:
            staged = staged_input_dir(input_dir)
        except SocketError as err:  # DRAGON's contract: unusable input is a JobError (exit 1)
            raise JobError(str(err)) from None
        return load_job(staged)

    def input_files(self, job: Job) -> Sequence[Path]:
        """The files process.py keys its journal on (the optional validation set is not one)."""
        return [job.input_dir / name for name in (CONFIG_FILE, TRAIN_FILE, TEST_FILE)]

    def verify(self, records: list[dict[str, Any]], job: Job) -> None:
        verify_predictions(records, job)

    def write(self, records: list[dict[str, Any]], job: Job, output_dir: Path) -> list[Path]:
        return [write_predictions(records, output_dir)]
