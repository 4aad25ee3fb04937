"""Which backend a run asks, and how it starts: the llama.cpp engine, the oracle, or none.

A run first needs the model's tokenizer (to size prompts), and only later the model itself, at a
context size known once the prompts are built; so opening a backend gives both, and the model is
loaded on the first `start(n_ctx)`, once per job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from extractor.backend import Backend, ChatTokenizer, PlainTokenizer
from extractor.dragon_io import Job, JobError
from extractor.engine import Engine, EngineError, EngineOptions, LlamaChat, free_memory_bytes, nvidia_gpu_visible
from extractor.preflight import check_model_file
from extractor.reference_backends import OracleBackend, PriorBackend, load_ground_truth
from extractor.schema import answer_schema
from extractor.settings import Settings, find_model
from extractor.summary import file_sha256
from extractor.taskfiles import Taskfile

log = logging.getLogger(__name__)

BACKENDS = ("llama", "oracle", "prior", "knn")
MIN_CONTEXT = 512


@dataclass
class OpenBackend:
    """A backend's tokenizer now, its model on demand; `model`/`model_sha256` name the file."""

    kind: str
    tokenizer: ChatTokenizer
    settings: Settings
    job: Job
    tf: Taskfile
    model_path: Path | None = None
    model_sha256: str = ""
    truth: dict | None = None
    _started: Backend | None = field(default=None, repr=False)

    def start(self, n_ctx: int) -> Backend:
        """The running backend with a context of at least `n_ctx` (loaded once; reloaded larger
        only when a later stage needs more)."""
        running = self._started
        if running is not None and not running.closed and (running.n_ctx or n_ctx) >= n_ctx:
            return running
        if running is not None:
            running.close()  # too small a context: free its memory before the larger one
        self._started = self._load(n_ctx)
        return self._started

    def close(self) -> None:
        if self._started is not None:
            self._started.close()

    def _load(self, n_ctx: int) -> Backend:
        if self.kind == "oracle":
            assert self.truth is not None
            return OracleBackend(self.truth, (*self.job.test, *self.job.validation), self.tf)
        if self.kind != "llama":
            return PriorBackend()
        assert self.model_path is not None
        seed = self.settings.seed if self.settings.seed is not None else self.job.config.jobid
        while True:
            options = EngineOptions(
                n_ctx=n_ctx,
                n_threads=self.settings.threads,
                gpu=self.settings.gpu,
                allow_cpu=self.settings.allow_cpu,
                seed=seed,
                n_seq=self.settings.parallel,
            )
            try:
                engine = Engine(self.model_path, options)  # --parallel 1: one slot; 0: automatic
                break
            except EngineError as err:
                # GPU memory: when the context cannot be allocated, try half as large.
                if n_ctx // 2 < MIN_CONTEXT or "context" not in str(err):
                    raise
                log.warning("%s; retrying with a %d-token context", err, n_ctx // 2)
                n_ctx //= 2
        engine.check_schema(answer_schema(self.tf, reasoning=self.tf.reasoning.enabled))
        return engine


def open_backend(kind: str, settings: Settings, job: Job, tf: Taskfile, ground_truth: Path | None) -> OpenBackend:
    """The backend of this kind for the job: its tokenizer at once, its model when started."""
    if kind == "oracle":
        if ground_truth is None:
            raise JobError("the oracle backend needs ground truth")
        # A perfect model answers validation cases perfectly too (their labels come with the job).
        truth = {**{c.uid: c.label for c in job.validation}, **load_ground_truth(ground_truth, job.config.label_name)}
        return OpenBackend(kind, PlainTokenizer(), settings, job, tf, truth=truth)
    if kind in ("prior", "knn"):
        return OpenBackend(kind, PlainTokenizer(), settings, job, tf)
    if kind != "llama":
        raise ValueError(f"unknown backend {kind!r}; known: {', '.join(BACKENDS)}")
    model_path = find_model(settings.model)
    on_gpu = settings.gpu != "off" and nvidia_gpu_visible() is not None
    check_model_file(model_path, gpu_memory=free_memory_bytes(True) if on_gpu else None)
    sha = file_sha256(model_path)
    log.info("model %s (sha256 %s)", model_path, sha[:12])
    return OpenBackend(kind, LlamaChat.open(model_path), settings, job, tf, model_path=model_path, model_sha256=sha)
