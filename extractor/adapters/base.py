"""The Adapter protocol: the only challenge-specific code between Grand Challenge and the pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from extractor.dragon_io import Job


@runtime_checkable
class Adapter(Protocol):
    """Loads one job's input sockets into cases plus a task configuration, and writes the
    post-processed prediction records (`{"uid": ..., <prediction key>: value}`) to the output
    sockets.

    `load` returns an `extractor.dragon_io.Job`: its `config` names the task (which Taskfile
    serves it) and the `label_name` (the task type: what the answer and the prediction look
    like); `test` holds the cases to answer, `train` solved cases for examples and the fallback
    (may be empty). Raise `extractor.dragon_io.JobError` or `extractor.gc_io.SocketError` for
    unusable inputs, `extractor.dragon_io.PredictionError` from `verify` for predictions that
    must not be written.
    """

    name: str

    def load(self, input_dir: Path) -> Job:
        """Read and validate the job's inputs."""
        ...

    def input_files(self, job: Job) -> Sequence[Path]:
        """The files whose content identifies the job (they key the checkpoint journal)."""
        ...

    def verify(self, records: list[dict[str, Any]], job: Job) -> None:
        """Check the predictions before anything is written."""
        ...

    def write(self, records: list[dict[str, Any]], job: Job, output_dir: Path) -> list[Path]:
        """Write the predictions to the output sockets; returns the paths written."""
        ...
