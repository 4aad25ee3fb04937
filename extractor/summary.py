"""The run summary: what ran, on what, how long each stage took, and what went wrong."""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

PACKAGES = ("llama-cpp-python", "pydantic", "numpy", "orjson", "tqdm")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class RunSummary:
    task_name: str = ""
    jobid: int = 0
    backend: str = ""
    model: str = ""
    model_sha256: str = ""
    taskfile: str = ""
    taskfile_sha256: str = ""
    cases: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # defective records left out, per file
    unreadable: int = 0  # test records whose input could not be read: answered by the base
    answered: int = 0
    blank: int = 0
    retries: int = 0
    failures: int = 0
    truncated: int = 0
    examples: int = 0
    translated: int = 0
    resumed: int = 0
    interrupted: bool = False
    degraded: dict[str, int] = field(default_factory=dict)
    choice: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0
    output_tokens: int = 0
    n_ctx: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    predictions: str = ""

    @contextmanager
    def stage(self, name: str):
        """Time one pipeline stage and log its start."""
        log.info("stage: %s", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = round(self.stage_seconds.get(name, 0.0) + time.perf_counter() - start, 3)

    def record_generation(self, stats: Any) -> None:
        """Copy the generation loop's counters (a GenerationStats) into the report."""
        for name in ("resumed", "interrupted", "degraded", "answered", "blank", "retries", "failures", "truncated"):
            setattr(self, name, getattr(stats, name))
        self.errors, self.prompt_tokens, self.output_tokens = stats.errors, stats.prompt_tokens, stats.output_tokens
        self.examples = stats.examples

    def _choice_line(self) -> str:
        """Which candidate answers the test set, and how it won on validation."""
        chosen = self.choice.get("chosen", "")
        rounds = [self.choice[r] for r in ("base", "model") if r in self.choice]
        if not rounds or not any(r["scores"].get(r["chosen"]) is not None for r in rounds):
            return f"answered by {chosen or 'the model'} (no validation score to choose by)"
        last = rounds[-1]
        cases = last["cases"].get(last["chosen"], 0)
        return f"answered by {chosen}: chosen on {cases} validation cases by {last['margin']:.3f} ({last['scores']})"

    def count_failure(self) -> None:
        self.failures += 1

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    def log_lines(self) -> list[str]:
        total = sum(self.stage_seconds.values())
        rate = self.cases / self.stage_seconds["generate"] if self.stage_seconds.get("generate") else 0.0
        return (
            [
                f"task {self.task_name} (job {self.jobid}) with {self.backend} backend, model {self.model}",
                f"taskfile {self.taskfile} ({self.taskfile_sha256[:12]})",
                f"cases {self.cases}: answered {self.answered}, blank {self.blank}, failures {self.failures} "
                f"(base answer used), retries {self.retries}, truncated prompts {self.truncated}",
                f"solved examples shown {self.examples}, resumed from the journal {self.resumed}",
                f"defective records dropped {self.dropped or 'none'}, unreadable test records {self.unreadable}",
                f"tokens: prompt {self.prompt_tokens}, output {self.output_tokens}; context {self.n_ctx}",
                "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.stage_seconds.items()) + f"; total {total:.1f}",
                f"throughput {rate:.2f} reports/s",
            ]
            + [self._choice_line()]
            + ([f"errors: {self.errors}"] if self.errors else [])
            + ([f"degraded to fit the time limit: {self.degraded}"] if self.degraded else [])
            + (["interrupted by a signal"] if self.interrupted else [])
        )
