"""Grand Challenge entry point: one DRAGON job in /input, its predictions in /output.

`run_job` is the pipeline, one stage per line; each stage is a method of `extractor.pipeline.JobRun`
and its work lives in one module of extractor/. Exit codes: 0 written, 1 unusable input or
environment, 2 predictions failed verification (nothing written), 3 interrupted by a signal
(complete predictions written, the fallback for unanswered reports).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from extractor.adapters import Adapter, DragonAdapter
from extractor.backend import clear_stop, request_stop
from extractor.dragon_io import JobError, PredictionError
from extractor.engine import EngineError
from extractor.gc_io import SocketError
from extractor.pipeline import JobRun
from extractor.settings import ModelNotFound, Settings, parse_settings
from extractor.summary import RunSummary
from extractor.taskfiles import TaskfileError

log = logging.getLogger("process")

EXIT_OK, EXIT_BAD_INPUT, EXIT_NOT_VERIFIED, EXIT_INTERRUPTED = 0, 1, 2, 3


def run_job(
    settings: Settings,
    *,
    backend: str = "llama",
    ground_truth: Path | None = None,
    started: float | None = None,
    adapter: Adapter | None = None,
) -> RunSummary:
    """Run one job end to end and write its predictions; returns what happened.

    The adapter is the challenge: DRAGON's four JSON files by default (extractor/adapters/)."""
    run = JobRun.begin(settings, adapter or DragonAdapter(), backend, ground_truth, started)
    stage = run.summary.stage
    try:
        with stage("load job"):
            run.load_job()
        with stage("check output folder"):
            run.check_output()
        with stage("pick taskfile"):
            run.pick_taskfile()
        with stage("index training set"):
            run.index_training_set()
        with stage("train heads"):
            run.train_heads()
        with stage("choose base on validation"):
            run.choose_base()
        if run.ask_model:
            with stage("open model"):
                run.open_model()
            if settings.translate:
                with stage("translate"):
                    run.translate()
            with stage("size prompts"):
                run.size_prompts()
            if run.job.validation and settings.validation_cases:
                with stage("choose with the model on validation"):
                    run.choose_with_model()
            with stage("generate"):
                run.generate()
        with stage("post-process"):
            run.post_process()
        with stage("verify"):
            run.verify()
        with stage("write"):
            run.write()
    finally:
        run.close()
    return run.summary


def main(
    argv: list[str] | None = None,
    *,
    adapter: Adapter | None = None,
    backend: str = "llama",
    ground_truth: Path | None = None,
    settings: Settings | None = None,
) -> int:
    """Run one job from the command line and return its exit code. Other challenges pass their adapter."""
    settings = settings or parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    started = time.monotonic()
    previous = install_signal_handlers()
    try:
        summary = run_job(settings, backend=backend, ground_truth=ground_truth, started=started, adapter=adapter)
    except (JobError, SocketError, TaskfileError, ModelNotFound, EngineError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    except PredictionError as err:
        log.error("nothing written: %s", err)
        return EXIT_NOT_VERIFIED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for line in summary.log_lines():
        log.info("summary: %s", line)
    if settings.summary:
        settings.summary.parent.mkdir(parents=True, exist_ok=True)
        settings.summary.write_bytes(summary.to_json())
    if summary.interrupted:
        log.error("interrupted by a signal: predictions written with the fallback for unanswered reports")
        return EXIT_INTERRUPTED
    return EXIT_OK


def install_signal_handlers() -> dict[int, Any]:
    """SIGTERM/SIGINT end generation at once; the job then writes complete predictions and exits 3.
    Returns the handlers they replace."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the writing
        request_stop(signal.Signals(signum).name)

    clear_stop()
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    return previous


if __name__ == "__main__":
    sys.exit(main())
