"""Grand Challenge entry point: one DRAGON job in /input, its predictions in /output.

The pipeline, one module of extractor/ per step:
load job -> pick Taskfile -> choose examples -> build prompts -> generate -> post-process -> verify -> write.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from extractor.adapters import Adapter, DragonAdapter
from extractor.backend import Backend, ChatTokenizer, PlainTokenizer, clear_stop, request_stop
from extractor.batch_engine import BatchedLlamaEngine
from extractor.dragon_io import Job, JobError, PredictionError
from extractor.engine import EngineError, EngineOptions, LlamaChat, LlamaEngine
from extractor.fewshot import NeighbourVote, Retriever, example_picker
from extractor.gc_io import SocketError
from extractor.generation import CaseAnswer, TimeBudget, answer_cases
from extractor.journal import Journal, journal_key
from extractor.metrics import task_score
from extractor.postprocess import blend_with_vote, to_prediction
from extractor.prior import TrainingPrior
from extractor.prompts import PromptBuilder
from extractor.reference_backends import OracleBackend, PriorBackend, load_ground_truth
from extractor.schema import answer_schema
from extractor.settings import ModelNotFound, Settings, find_model, parse_settings
from extractor.summary import RunSummary, file_sha256
from extractor.taskfiles import Examples, Reasoning, Taskfile, TaskfileError, load_taskfiles, taskfile_for_job
from extractor.translate import translate_cases

log = logging.getLogger("process")

CONTEXT_STEP = 256
MIN_CONTEXT = 512
CODE_DIR = Path(__file__).resolve().parent / "extractor"
BACKENDS = ("llama", "oracle", "prior", "knn")
EXIT_INTERRUPTED = 3
VOTE = "vote"  # the validation candidate that answers without the model


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
    adapter = adapter or DragonAdapter()
    summary = RunSummary(backend=backend)
    started = time.monotonic() if started is None else started
    budget = TimeBudget(deadline=started + settings.time_limit if settings.time_limit else None)

    with summary.stage("load job"):
        job = adapter.load(settings.input)
        if settings.max_cases is not None:
            job = dataclasses.replace(job, test=job.test[: settings.max_cases])
        summary.task_name, summary.jobid, summary.cases = job.config.task_name, job.config.jobid, len(job.test)
        log.info("%s: %d training, %d test cases", job.config.task_name, len(job.train), len(job.test))

    with summary.stage("pick taskfile"):
        tf = apply_settings(taskfile_for_job(job.config, job.train, load_taskfiles(settings.taskfiles)), settings)
        summary.taskfile, summary.taskfile_sha256 = tf.source, tf.digest()

    with summary.stage("choose examples"):
        retriever = Retriever(job.train)
        fallback = choose_fallback(settings, backend, job, retriever)

    with summary.stage("build prompts"):
        kind = backend if job.test else "prior"  # nothing to ask: no model to load
        tokenizer, start_backend = open_backend(kind, settings, job, tf, ground_truth, summary)
        if settings.translate and job.test:
            job = translate_job(job, tf, tokenizer, start_backend, settings, summary)
        builder = prompt_builder(tf, tokenizer, job, settings, retriever, summary)

    ask_model = bool(job.test)
    if settings.choose_examples and job.validation and job.test:
        with summary.stage("choose examples on validation"):
            chosen = choose_on_validation(job, tf, tokenizer, start_backend, retriever, fallback, settings, summary)
            if chosen is None:  # the neighbours' vote beat every way of asking the model
                ask_model = False
            elif chosen != tf:
                tf, builder = chosen, examples_builder(chosen, tokenizer, job, retriever, summary.n_ctx)

    with summary.stage("generate"):
        journal = open_journal(settings, job, tf, summary, adapter.input_files(job)) if ask_model else None
        answers = generate(job, builder, start_backend, summary, budget, journal) if ask_model else {}

    with summary.stage("post-process"):
        records = predictions(job, tf, answers, fallback, settings.blend, summary)

    with summary.stage("verify"):
        adapter.verify(records, job)

    with summary.stage("write"):
        summary.predictions = ", ".join(str(p) for p in adapter.write(records, job, settings.output))
    return summary


def apply_settings(tf: Taskfile, settings: Settings) -> Taskfile:
    """Command-line overrides of the Taskfile's reasoning, examples and output budget."""
    update: dict[str, Any] = {}
    if settings.reasoning != "auto":
        update["reasoning"] = Reasoning(enabled=settings.reasoning == "on", max_chars=tf.reasoning.max_chars)
    if settings.max_output_tokens is not None:
        update["max_output_tokens"] = max(8, min(tf.max_output_tokens, settings.max_output_tokens))
    if settings.examples != "auto" or settings.k is not None:
        strategy = tf.examples.strategy if settings.examples == "auto" else settings.examples
        k = tf.examples.k if settings.k is None else settings.k
        update["examples"] = Examples(strategy=strategy, k=k, max_chars=tf.examples.max_chars)
    return tf.model_copy(update=update) if update else tf


def choose_fallback(settings: Settings, backend: str, job: Job, retriever: Retriever) -> Callable[[Any], Any]:
    """The answer for cases the model could not answer: the neighbours' vote, or the training prior."""
    use_knn = backend == "knn" or (backend != "prior" and settings.fallback == "knn")
    if use_knn and job.train:
        return NeighbourVote(job.train, job.task_type, retriever, settings.vote_k)
    return TrainingPrior(job.train, job.task_type)


def open_backend(
    kind: str, settings: Settings, job: Job, tf: Taskfile, ground_truth: Path | None, summary: RunSummary
) -> tuple[ChatTokenizer, Callable[[int], Backend]]:
    """The tokenizer prompts are counted with, and a function that starts the backend for a context size."""
    if kind == "oracle":
        if ground_truth is None:
            raise JobError("the oracle backend needs ground truth")
        truth = load_ground_truth(ground_truth, job.config.label_name)
        return PlainTokenizer(), lambda n_ctx: OracleBackend(truth, job.test, tf)
    if kind in ("prior", "knn"):
        return PlainTokenizer(), lambda n_ctx: PriorBackend()
    if kind != "llama":
        raise ValueError(f"unknown backend {kind!r}; known: {', '.join(BACKENDS)}")

    model_path = find_model(settings.model)
    summary.model, summary.model_sha256 = model_path.name, file_sha256(model_path)
    log.info("model %s (sha256 %s)", model_path, summary.model_sha256[:12])

    started: list[LlamaEngine | BatchedLlamaEngine] = []

    def start(n_ctx: int) -> Backend:
        """Load the model (once per job); when the context cannot be allocated (GPU memory), try half as large."""
        if started and started[0].n_ctx >= n_ctx and not started[0].closed:
            return started[0]
        if started:
            started.pop().close()  # too small a context: free its memory before the larger one
        seed = settings.seed if settings.seed is not None else job.config.jobid
        while True:
            options = EngineOptions(
                n_ctx=n_ctx,
                n_threads=settings.threads,
                gpu=settings.gpu,
                allow_cpu=settings.allow_cpu,
                seed=seed,
                n_seq=settings.parallel,
            )
            try:
                # --parallel 1 keeps the one-report-at-a-time engine; otherwise N reports share each step.
                engine = (
                    LlamaEngine(model_path, options)
                    if settings.parallel == 1
                    else BatchedLlamaEngine(model_path, options)
                )
                break
            except EngineError as err:
                if n_ctx // 2 < MIN_CONTEXT or "context" not in str(err):
                    raise
                log.warning("%s; retrying with a %d-token context", err, n_ctx // 2)
                n_ctx //= 2
        engine.check_schema(answer_schema(tf, reasoning=tf.reasoning.enabled))
        started[:] = [engine]
        return engine

    return LlamaChat.open(model_path), start


def translate_job(
    job: Job,
    tf: Taskfile,
    tokenizer: ChatTokenizer,
    start_backend: Callable[[int], Backend],
    settings: Settings,
    summary: RunSummary,
) -> Job:
    """The ablation pre-pass: the same model translates every test report to English."""
    limit = min(tokenizer.context_limit, settings.n_ctx or 4096)
    backend = start_backend(limit)
    try:
        cases, failed = translate_cases(job.test, tf, backend, tokenizer, limit)
    finally:
        close_backend(backend)
    summary.translated = len(job.test) - failed
    log.info("translated %d of %d test reports to English", summary.translated, len(job.test))
    return dataclasses.replace(job, test=tuple(cases))


def context_for(longest_prompt: int, tf: Taskfile) -> int:
    """Context for a job: its longest prompt plus a retry's doubled output budget, in 256-token steps."""
    return -(-(longest_prompt + 2 * tf.max_output_tokens + 16) // CONTEXT_STEP) * CONTEXT_STEP


def prompt_builder(
    tf: Taskfile,
    tokenizer: ChatTokenizer,
    job: Job,
    settings: Settings,
    retriever: Retriever,
    summary: RunSummary,
) -> PromptBuilder:
    """A prompt builder whose context is sized to this job: longest prompt plus a retry's output."""
    builder = examples_builder(tf, tokenizer, job, retriever, settings.n_ctx or tokenizer.context_limit)
    longest = max(
        (
            builder.build(c, reasoning=tf.reasoning.enabled, max_tokens=tf.max_output_tokens).request.prompt_tokens
            for c in job.test
        ),
        default=0,
    )
    summary.n_ctx = builder.context_limit = min(context_for(longest, tf), builder.context_limit)
    log.info(
        "context %d tokens (longest prompt %d); examples: %s, k=%d",
        summary.n_ctx,
        longest,
        tf.examples.strategy,
        tf.examples.k,
    )
    return builder


def choose_on_validation(
    job: Job,
    tf: Taskfile,
    tokenizer: ChatTokenizer,
    start_backend: Callable[[int], Backend],
    retriever: Retriever,
    fallback: Callable[[Any], Any],
    settings: Settings,
    summary: RunSummary,
) -> Taskfile | None:
    """Score zero-shot, fixed and retrieved examples on the first validation cases, post-processed
    exactly as the test set will be (fallback and blend included); returns the Taskfile with the best.

    With the neighbour vote as fallback, the vote alone is a candidate too: None means it won, and
    the test set is answered without the model (a model that adds nothing should not cost a score).
    The validation set only chooses; it is never shown to the model as examples.
    """
    sample = job.validation[: settings.choose_examples]
    truth = [c.label for c in sample]
    k = tf.examples.k or 4
    backend = start_backend(summary.n_ctx)
    scores: dict[str, float] = {}
    for strategy in ("none", "fixed", "retrieved"):
        candidate = with_examples(tf, strategy, k)
        builder = examples_builder(candidate, tokenizer, job, retriever, summary.n_ctx)
        answers, stats = answer_cases(sample, builder, backend)
        if stats.interrupted:  # a signal: no choice; generation stops at once and the job writes its fallback
            return tf
        records = predictions(
            dataclasses.replace(job, test=sample), candidate, answers, fallback, settings.blend, RunSummary()
        )
        scores[strategy] = task_score(job.task_type, truth, [r[job.task_type.prediction_key] for r in records])
    if isinstance(fallback, NeighbourVote):
        scores[VOTE] = task_score(job.task_type, truth, [fallback(c) for c in sample])
    # Ties (to 6 decimals: float noise must not decide) go to the Taskfile's strategy, then to the model over the vote.
    best = max(scores, key=lambda name: (round(scores[name], 6), name == tf.examples.strategy, name != VOTE))
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    margin = ranked[0][1] - ranked[1][1] if len(ranked) > 1 else 0.0
    log.info("on %d validation cases: %s; using %s (by %.3f)", len(sample), scores, best, margin)
    summary.choice = {"scores": scores, "chosen": best, "validation_cases": len(sample)}
    if best == VOTE:
        log.warning("the neighbour vote beat the model on validation: the test set is answered without the model")
        close_backend(backend)
        return None
    return with_examples(tf, best, k)


def close_backend(backend: Backend) -> None:
    """Free the model's memory; backends without a model have nothing to close."""
    close = getattr(backend, "close", None)
    if close:
        close()


def with_examples(tf: Taskfile, strategy: str, k: int) -> Taskfile:
    return tf.model_copy(update={"examples": Examples(strategy=strategy, k=k, max_chars=tf.examples.max_chars)})


def examples_builder(
    tf: Taskfile, tokenizer: ChatTokenizer, job: Job, retriever: Retriever, context_limit: int
) -> PromptBuilder:
    """A prompt builder for the Taskfile's example strategy, in the context already sized for the job."""
    picker = example_picker(tf.examples.strategy, tf.examples.k, job.train, job.task_type, retriever)
    return PromptBuilder(
        tf, tokenizer, truncation_side=job.config.recommended_truncation_side,
        context_limit=context_limit, examples=picker,
    )  # fmt: skip


def open_journal(
    settings: Settings, job: Job, tf: Taskfile, summary: RunSummary, input_files: Sequence[Path]
) -> Journal | None:
    """The checkpoint journal of this exact job, model, Taskfile and settings."""
    if not settings.journal:
        return None
    answer_settings = (settings.examples, settings.k, settings.reasoning, settings.translate, settings.n_ctx)
    # The code (this file and the package) is part of the key: answers from another version of the
    # pipeline are not reused.
    files = [*input_files, Path(__file__).resolve(), *sorted(CODE_DIR.glob("*.py"))]
    key = journal_key(summary.backend, summary.model_sha256, tf.digest(), answer_settings, files=files)
    return Journal(settings.work_dir / f"{job.config.task_name}-{key[:16]}.jsonl")


def generate(
    job: Job,
    builder: PromptBuilder,
    start_backend: Callable[[int], Backend],
    summary: RunSummary,
    budget: TimeBudget,
    journal: Journal | None,
) -> dict[str, CaseAnswer]:
    done = journal.load() if journal else {}
    backend = start_backend(summary.n_ctx)
    if getattr(backend, "n_ctx", summary.n_ctx) < summary.n_ctx:
        summary.n_ctx = builder.context_limit = backend.n_ctx  # the engine had to settle for less
    interactive = sys.stderr.isatty()

    def finished(answer: CaseAnswer) -> None:
        bar.update(1)
        if journal:
            journal.append(answer)

    # A line every 30 s in platform logs; live on a terminal.
    with tqdm(total=len(job.test), unit="report", file=sys.stderr, mininterval=0.5 if interactive else 30) as bar:
        bar.update(sum(1 for c in job.test if c.is_blank or c.uid in done))
        try:
            # Chunks of several times N keep the batched engine's sequences busy between the refills.
            chunk = max(32, 4 * getattr(backend, "n_seq", 1))
            answers, stats = answer_cases(
                job.test, builder, backend, on_result=finished, budget=budget, done=done, chunk_size=chunk
            )
        finally:
            if journal:
                journal.close()
    summary.resumed, summary.interrupted, summary.degraded = stats.resumed, stats.interrupted, stats.degraded
    summary.answered, summary.blank, summary.retries = stats.answered, stats.blank, stats.retries
    summary.failures, summary.truncated, summary.errors = stats.failures, stats.truncated, stats.errors
    summary.prompt_tokens, summary.output_tokens = stats.prompt_tokens, stats.output_tokens
    summary.examples = stats.examples
    engine_stats = getattr(backend, "stats", None)
    if engine_stats is not None:
        summary.engine = {
            k: (round(v, 3) if isinstance(v, float) else v) for k, v in dataclasses.asdict(engine_stats).items()
        }
    close_backend(backend)
    if stats.truncated:
        log.warning(
            "%d reports were cut on the %s to fit the context", stats.truncated, job.config.recommended_truncation_side
        )
    log.info("%d solved examples shown in %d prompts", stats.examples, len(job.test) - stats.blank)
    return answers


def predictions(
    job: Job,
    tf: Taskfile,
    answers: dict[str, CaseAnswer],
    fallback: Callable[[Any], Any],
    blend: float,
    summary: RunSummary,
) -> list[dict[str, Any]]:
    """One record per test case: the model's answer post-processed (and blended with the
    neighbours' vote when asked), or the fallback answer."""
    key = job.task_type.prediction_key
    vote = fallback if isinstance(fallback, NeighbourVote) and blend > 0 else None
    records = []
    for case in job.test:
        answer = answers.get(case.uid)
        value = None
        if answer is not None and answer.ok:
            try:
                value = to_prediction(answer.answer, answer.likelihoods, tf, case.parts)
                if vote is not None:
                    value = blend_with_vote(value, answer.likelihoods, vote(case), vote.shares(case), blend, tf)
            except (ValueError, KeyError, TypeError) as err:
                log.warning("uid %s: answer could not be post-processed (%s); using the fallback", case.uid, err)
                summary.failures += 1
        if value is None:
            value = fallback(case)
        records.append({"uid": case.uid, key: value})
    return records


def main(
    argv: list[str] | None = None,
    *,
    adapter: Adapter | None = None,
    backend: str = "llama",
    ground_truth: Path | None = None,
    settings: Settings | None = None,
) -> int:
    """Run one job from the command line; exit code 0 written, 1 bad input, 2 failed verification,
    3 interrupted (complete predictions written). Other challenges pass their adapter."""
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
        return 1
    except PredictionError as err:
        log.error("nothing written: %s", err)
        return 2
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
    return 0


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
