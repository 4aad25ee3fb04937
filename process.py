"""Grand Challenge entry point: one DRAGON job in /input, its predictions in /output.

The pipeline, one module of extractor/ per step:
load job -> pick Taskfile -> build prompts -> generate -> post-process -> verify -> write.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from extractor.backend import Backend, ChatTokenizer, PlainTokenizer
from extractor.dragon_io import (
    Job,
    JobError,
    PredictionError,
    load_job,
    verify_predictions,
    write_predictions,
)
from extractor.engine import EngineError, EngineOptions, LlamaChat, LlamaEngine
from extractor.generation import CaseAnswer, answer_cases
from extractor.postprocess import to_prediction
from extractor.prior import TrainingPrior
from extractor.prompts import PromptBuilder
from extractor.reference_backends import OracleBackend, PriorBackend, load_ground_truth
from extractor.schema import answer_schema
from extractor.settings import ModelNotFound, Settings, find_model, parse_settings
from extractor.summary import RunSummary, file_sha256
from extractor.taskfiles import (
    Reasoning,
    Taskfile,
    TaskfileError,
    load_taskfiles,
    taskfile_for_job,
)

log = logging.getLogger("process")

CONTEXT_STEP = 256


def run_job(settings: Settings, *, backend: str = "llama", ground_truth: Path | None = None) -> RunSummary:
    """Run one job end to end and write its predictions; returns what happened."""
    summary = RunSummary(backend=backend)

    with summary.stage("load job"):
        job = load_job(settings.input)
        cases = job.test[: settings.max_cases] if settings.max_cases is not None else job.test
        job = dataclasses.replace(job, test=cases)
        summary.task_name, summary.jobid, summary.cases = (
            job.config.task_name,
            job.config.jobid,
            len(cases),
        )
        log.info(
            "%s: %d training, %d test cases",
            job.config.task_name,
            len(job.train),
            len(cases),
        )

    with summary.stage("pick taskfile"):
        tf = apply_reasoning_setting(
            taskfile_for_job(job.config, job.train, load_taskfiles(settings.taskfiles)),
            settings,
        )
        summary.taskfile, summary.taskfile_sha256 = tf.source, tf.digest()

    with summary.stage("build prompts"):
        kind = backend if cases else "prior"  # nothing to ask: no model to load
        tokenizer, start_backend = open_backend(kind, settings, job, tf, ground_truth, summary)
        builder = PromptBuilder(
            tf,
            tokenizer,
            truncation_side=job.config.recommended_truncation_side,
            context_limit=settings.n_ctx or tokenizer.context_limit,
        )
        summary.n_ctx = context_size(builder, job)
        builder.context_limit = summary.n_ctx

    with summary.stage("generate"):
        answers = generate(job, builder, start_backend, summary) if cases else {}

    with summary.stage("post-process"):
        records = predictions(job, tf, answers, summary)

    with summary.stage("verify"):
        verify_predictions(records, job)

    with summary.stage("write"):
        summary.predictions = str(write_predictions(records, settings.output))
    return summary


def apply_reasoning_setting(tf: Taskfile, settings: Settings) -> Taskfile:
    if settings.reasoning == "auto":
        return tf
    return tf.model_copy(
        update={"reasoning": Reasoning(enabled=settings.reasoning == "on", max_chars=tf.reasoning.max_chars)}
    )


def open_backend(
    kind: str,
    settings: Settings,
    job: Job,
    tf: Taskfile,
    ground_truth: Path | None,
    summary: RunSummary,
) -> tuple[ChatTokenizer, Callable[[int], Backend]]:
    """The tokenizer prompts are counted with, and a function that starts the backend for a context size."""
    if kind == "oracle":
        if ground_truth is None:
            raise JobError("the oracle backend needs ground truth")
        truth = load_ground_truth(ground_truth, job.config.label_name)
        return PlainTokenizer(), lambda n_ctx: OracleBackend(truth, job.test, tf)
    if kind == "prior":
        return PlainTokenizer(), lambda n_ctx: PriorBackend()
    if kind != "llama":
        raise ValueError(f"unknown backend {kind!r}")
    model_path = find_model(settings.model)
    summary.model, summary.model_sha256 = model_path.name, file_sha256(model_path)
    log.info("model %s (sha256 %s)", model_path, summary.model_sha256[:12])

    def start(n_ctx: int) -> Backend:
        seed = settings.seed if settings.seed is not None else job.config.jobid
        options = EngineOptions(
            n_ctx=n_ctx,
            n_threads=settings.threads,
            gpu=settings.gpu,
            allow_cpu=settings.allow_cpu,
            seed=seed,
        )
        engine = LlamaEngine(model_path, options)
        engine.check_schema(answer_schema(tf, reasoning=tf.reasoning.enabled))
        return engine

    return LlamaChat.open(model_path), start


def context_size(builder: PromptBuilder, job: Job) -> int:
    """Longest prompt plus room for a retry's doubled output budget, capped by the model's context."""
    longest = max(
        (
            builder.build(
                c,
                reasoning=builder.tf.reasoning.enabled,
                max_tokens=builder.tf.max_output_tokens,
            ).request.prompt_tokens
            for c in job.test
        ),
        default=0,
    )
    wanted = longest + 2 * builder.tf.max_output_tokens + 16
    wanted = -(-wanted // CONTEXT_STEP) * CONTEXT_STEP
    return min(wanted, builder.context_limit)


def generate(
    job: Job,
    builder: PromptBuilder,
    start_backend: Callable[[int], Backend],
    summary: RunSummary,
) -> dict[str, CaseAnswer]:
    backend = start_backend(summary.n_ctx)
    interactive = sys.stderr.isatty()
    with tqdm(
        total=len(job.test),
        unit="report",
        file=sys.stderr,
        mininterval=0.5 if interactive else 30,
        disable=None,
    ) as bar:
        bar.update(sum(1 for c in job.test if c.is_blank))
        answers, stats = answer_cases(job.test, builder, backend, on_result=lambda _: bar.update(1))
    summary.answered, summary.blank, summary.retries = (
        stats.answered,
        stats.blank,
        stats.retries,
    )
    summary.failures, summary.truncated, summary.errors = (
        stats.failures,
        stats.truncated,
        stats.errors,
    )
    summary.prompt_tokens, summary.output_tokens = (
        stats.prompt_tokens,
        stats.output_tokens,
    )
    engine_stats = getattr(backend, "stats", None)
    if engine_stats is not None:
        summary.engine = {
            k: (round(v, 3) if isinstance(v, float) else v) for k, v in dataclasses.asdict(engine_stats).items()
        }
    close = getattr(backend, "close", None)
    if close:
        close()
    if stats.truncated:
        log.warning(
            "%d reports were cut on the %s to fit the context",
            stats.truncated,
            job.config.recommended_truncation_side,
        )
    return answers


def predictions(job: Job, tf: Taskfile, answers: dict[str, CaseAnswer], summary: RunSummary) -> list[dict[str, Any]]:
    """One record per test case: the model's answer post-processed, or the training prior."""
    key = job.task_type.prediction_key
    prior = TrainingPrior(job.train, job.task_type)
    records = []
    for case in job.test:
        answer = answers.get(case.uid)
        value = None
        if answer is not None and answer.ok:
            try:
                value = to_prediction(answer.answer, answer.likelihoods, tf, case.parts)
            except (ValueError, KeyError, TypeError) as err:
                log.warning(
                    "uid %s: answer could not be post-processed (%s); using the prior",
                    case.uid,
                    err,
                )
                summary.failures += 1
        if value is None:
            value = prior(case)
        records.append({"uid": case.uid, key: value})
    return records


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        summary = run_job(settings)
    except (JobError, TaskfileError, ModelNotFound, EngineError) as err:
        log.error("%s", err)
        return 1
    except PredictionError as err:
        log.error("nothing written: %s", err)
        return 2
    for line in summary.log_lines():
        log.info("summary: %s", line)
    if settings.summary:
        settings.summary.parent.mkdir(parents=True, exist_ok=True)
        settings.summary.write_bytes(summary.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
