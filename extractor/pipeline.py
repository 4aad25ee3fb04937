"""One job's run: what the stages that process.py lists do, and what they share.

`JobRun` holds a job's run (settings, job, Taskfile, retrieval index, fallback, backend, prompt
builder, time budget); each method is one stage and reads what earlier stages set. The run
summary only reports: nothing is read back from it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from extractor.adapters import Adapter
from extractor.backend import Backend, ChatTokenizer
from extractor.backends import OpenBackend, open_backend
from extractor.choice import (
    BLEND_WEIGHTS,
    Candidate,
    Precomputed,
    choose_base,
    choose_with_model,
    fallback_candidate,
    head_candidate,
)
from extractor.dragon_io import Job, JobError
from extractor.embeddings import embedding_head_wanted, train_embedding_head
from extractor.fewshot import NeighbourVote, Retriever, example_picker
from extractor.generation import CaseAnswer, TimeBudget, answer_cases
from extractor.heads import train_heads
from extractor.journal import Journal, journal_key
from extractor.metrics import task_score
from extractor.postprocess import blend_with_vote, to_prediction
from extractor.preflight import check_output_dir
from extractor.prior import Fallback, TrainingPrior
from extractor.prompts import PromptBuilder
from extractor.settings import Settings
from extractor.summary import RunSummary
from extractor.taskfiles import MAX_OUTPUT_TOKENS, Taskfile, load_taskfiles, taskfile_for_job
from extractor.translate import translate_cases

log = logging.getLogger("pipeline")

CONTEXT_STEP = 256
# The code is part of the journal's key: answers from another version of the pipeline are not reused.
CODE_FILES = (Path(__file__).resolve().parents[1] / "process.py", *sorted(Path(__file__).resolve().parent.glob("*.py")))
REFERENCE_BACKENDS = ("knn", "prior")  # answer with the vote / the prior alone, no model, no heads


@dataclass(frozen=True)
class ModelVariant:
    """One way of using the model on validation: its Taskfile (example strategy) and blend weight."""

    tf: Taskfile
    blend: float
    strategy: str


def context_for(longest_prompt: int, tf: Taskfile) -> int:
    """Context for a job: its longest prompt plus a retry's doubled output budget, in 256-token steps."""
    return -(-(longest_prompt + 2 * tf.max_output_tokens + 16) // CONTEXT_STEP) * CONTEXT_STEP


CHARS_PER_TOKEN = 3  # a cautious average for the reasoning text's token count


def apply_settings(tf: Taskfile, settings: Settings) -> Taskfile:
    """Command-line overrides of the Taskfile's reasoning, examples and output budget. Reasoning
    switched on where the Taskfile has it off also gets room: its `max_chars` in tokens on top of
    the Taskfile's budget, which was sized for the answer alone."""
    update: dict[str, Any] = {}
    budget = tf.max_output_tokens
    if settings.reasoning != "auto":
        update["reasoning"] = tf.reasoning.model_copy(update={"enabled": settings.reasoning == "on"})
        if settings.reasoning == "on" and not tf.reasoning.enabled:
            budget = min(MAX_OUTPUT_TOKENS, budget + -(-tf.reasoning.max_chars // CHARS_PER_TOKEN))
            update["max_output_tokens"] = budget
    if settings.max_output_tokens is not None:
        update["max_output_tokens"] = max(8, min(budget, settings.max_output_tokens))
    if settings.examples != "auto" or settings.k is not None:
        strategy = tf.examples.strategy if settings.examples == "auto" else settings.examples
        k = tf.examples.k if settings.k is None else settings.k
        update["examples"] = tf.examples.model_copy(update={"strategy": strategy, "k": k})
    return tf.model_copy(update=update) if update else tf


def with_examples(tf: Taskfile, strategy: str, k: int) -> Taskfile:
    return tf.model_copy(update={"examples": tf.examples.model_copy(update={"strategy": strategy, "k": k})})


@dataclass
class JobRun:
    """The state of one job's run, filled in stage by stage."""

    settings: Settings
    adapter: Adapter
    backend_kind: str = "llama"
    ground_truth: Path | None = None
    budget: TimeBudget = field(default_factory=TimeBudget)
    summary: RunSummary = field(default_factory=RunSummary)
    job: Job = None  # type: ignore[assignment]  # set by load_job
    tf: Taskfile = None  # type: ignore[assignment]  # set by pick_taskfile
    retriever: Retriever | None = None
    candidates: list[Candidate] = field(default_factory=list)
    base_candidate: Candidate | None = None
    base: Precomputed | None = None  # the base's answers for the test set: the fallback of every case
    blend: float = 0.0
    model_fields: tuple[bool, ...] | None = None  # a per-field mix: the positions the model answers
    backend: OpenBackend | None = None
    builder: PromptBuilder | None = None
    n_ctx: int = 0
    ask_model: bool = True
    answers: dict[str, CaseAnswer] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def begin(
        cls, settings: Settings, adapter: Adapter, backend: str, ground_truth: Path | None, started: float | None
    ) -> JobRun:
        started = time.monotonic() if started is None else started
        deadline = started + settings.time_limit if settings.time_limit else None
        return cls(
            settings,
            adapter,
            backend,
            ground_truth,
            budget=TimeBudget(deadline=deadline, started=started),
            summary=RunSummary(backend=backend),
        )

    @property
    def tokenizer(self) -> ChatTokenizer:
        assert self.backend is not None
        return self.backend.tokenizer

    # --- stages -------------------------------------------------------------------------------

    def load_job(self) -> None:
        job = self.adapter.load(self.settings.input)
        if self.settings.max_cases is not None:
            job = dataclasses.replace(job, test=job.test[: self.settings.max_cases])
        self.job = job
        self.summary.blank = sum(c.is_blank for c in job.test)  # answered by the base, never asked
        self.summary.dropped, self.summary.unreadable = dict(job.dropped), len(job.unreadable)
        self.summary.task_name, self.summary.jobid, self.summary.cases = (
            job.config.task_name,
            job.config.jobid,
            len(job.test),
        )
        log.info("%s: %d training, %d test cases", job.config.task_name, len(job.train), len(job.test))

    def check_output(self) -> None:
        """Fail in one line now, not after the work, when the output cannot be written."""
        check_output_dir(self.settings.output)

    def pick_taskfile(self) -> None:
        tf = taskfile_for_job(self.job.config, self.job.train, load_taskfiles(self.settings.taskfiles))
        self.tf = apply_settings(tf, self.settings)
        self.summary.taskfile, self.summary.taskfile_sha256 = self.tf.source, self.tf.digest()

    def index_training_set(self) -> None:
        """The BM25 index of the training reports: solved examples and the neighbour vote."""
        self.retriever = Retriever(self.job.train)

    def train_heads(self) -> None:
        """The model-free candidates, most specific first: the heads trained on the training set
        (unless --heads off or a reference backend), the neighbour vote, the training prior."""
        job, kind = self.job, self.backend_kind
        prior = TrainingPrior(job.train, job.task_type)
        vote = NeighbourVote(job.train, job.task_type, self.retriever, self.settings.vote_k) if job.train else None
        candidates: list[Candidate] = []
        seed = self.settings.seed if self.settings.seed is not None else job.config.jobid
        if kind not in REFERENCE_BACKENDS and self.settings.heads:
            try:
                candidates += [head_candidate(h) for h in train_heads(job.train, job.task_type, seed=seed)]
            except Exception as err:  # noqa: BLE001 - the vote and the prior still answer
                log.warning("the heads could not be trained (%s); the vote and the prior remain", err)
        if kind == "llama" and embedding_head_wanted(self.settings.embedding_head, self.settings.gpu):
            self.open_model()  # the model file and its hash, needed now by the embedding pass
            assert self.backend is not None and self.backend.model_path is not None
            path, sha = self.backend.model_path, self.backend.model_sha256
            head = train_embedding_head(job, path, sha, self.settings, seed, self.budget.seconds_left)
            candidates += [head_candidate(head)] if head is not None else []
        if vote is not None and kind != "prior":
            candidates.append(fallback_candidate(vote, job.task_type))
        if kind != "knn" or vote is None:
            candidates.append(fallback_candidate(prior, job.task_type))
        self.candidates = candidates
        log.info("model-free candidates: %s", ", ".join(c.name for c in candidates))

    def choose_base(self) -> None:
        """Round 1 of the validation choice: the best model-free candidate on every validation
        case answers whatever the model does not (and everything, if the model loses)."""
        job = self.job
        choice = choose_base(self.candidates, job.validation, self._metric, per_field=self._per_field)
        if choice.mixed is not None:
            self.candidates.append(choice.mixed)
        score = {c.name: c.score for c in choice.scores}
        # The chosen first; if it cannot answer the test set, the next best does (the prior last).
        ranked = sorted(
            self.candidates,
            key=lambda c: (c.name != choice.chosen, -(score[c.name] if score.get(c.name) is not None else -1.0)),
        )
        for candidate in ranked:
            try:
                self.base, self.base_candidate = Precomputed(candidate, job.test), candidate
                break
            except Exception as err:  # noqa: BLE001 - a head that fails on the test set costs only itself
                log.warning("%s could not answer the test set (%s); trying the next candidate", candidate.name, err)
        else:
            raise JobError("no candidate could answer the test set, not even the training prior")
        if self.base_candidate.name != choice.chosen:
            choice.chosen = self.base_candidate.name
        self.summary.choice["base"] = choice.as_dict()
        self.summary.choice["chosen"] = choice.chosen
        self.ask_model = bool(job.test) and self.backend_kind not in REFERENCE_BACKENDS
        if self.ask_model and job.validation and self.settings.validation_cases == 0:
            log.info("--validation-cases 0: the test set is answered by %s, without the model", choice.chosen)
            self.ask_model = False

    def open_model(self) -> None:
        """The backend's tokenizer (and, for llama, the model file's hash); the model loads later."""
        # Reached when the model is asked (process.py runs it under `run.ask_model`), and earlier
        # by train_heads for the embedding head: opened once.
        if self.backend is not None:
            return
        self.backend = open_backend(self.backend_kind, self.settings, self.job, self.tf, self.ground_truth)
        if self.backend.model_path is not None:
            self.summary.model, self.summary.model_sha256 = self.backend.model_path.name, self.backend.model_sha256

    def translate(self) -> None:
        """The ablation pre-pass: the same model translates every test report to English."""
        limit = min(self.tokenizer.context_limit, self.settings.n_ctx or 4096)
        backend = self._start(limit)
        try:
            cases, failed = translate_cases(self.job.test, self.tf, backend, self.tokenizer, limit)
        finally:
            backend.close()
        self.summary.translated = len(self.job.test) - failed
        log.info("translated %d of %d test reports to English", self.summary.translated, len(self.job.test))
        self.job = dataclasses.replace(self.job, test=tuple(cases))

    def size_prompts(self) -> None:
        """Build every test prompt once to size the context: the longest prompt plus a retry's output."""
        builder = self._builder(self.tf, self.settings.n_ctx or self.tokenizer.context_limit)
        tf = self.tf
        longest = max(
            (
                builder.build(c, reasoning=tf.reasoning.enabled, max_tokens=tf.max_output_tokens).request.prompt_tokens
                for c in self.job.test
                if not c.is_blank  # never asked
            ),
            default=0,
        )
        self.n_ctx = builder.context_limit = min(context_for(longest, tf), builder.context_limit)
        self.builder = builder
        self.summary.n_ctx = self.n_ctx
        log.info(
            "context %d tokens (longest prompt %d); examples: %s, k=%d",
            self.n_ctx,
            longest,
            tf.examples.strategy,
            tf.examples.k,
        )

    def choose_with_model(self) -> None:
        """Round 2: the model answers the first N validation cases (fewer when the time budget says
        so); the model alone, its blends with the base and any other example strategy compete
        with the base on those same cases. The model answers the test set only if it wins."""
        job, tf = self.job, self.tf
        sample = list(job.validation[: self.settings.validation_cases])
        backend = self._start(self.n_ctx)
        strategies = [tf.examples.strategy, *(x for x in self.settings.try_examples if x != tf.examples.strategy)]
        variants: dict[str, ModelVariant] = {}
        answered: dict[str, dict[str, CaseAnswer]] = {}
        for strategy in strategies:
            candidate_tf = with_examples(tf, strategy, tf.examples.k or 4)
            answers, sample, interrupted = self._answer_validation(sample, candidate_tf, backend)
            if interrupted:  # a signal: no choice; the job writes the base's answers and exits 3
                self.summary.interrupted, self.ask_model = True, False
                return
            answered[strategy] = answers
            name = "llm" if len(strategies) == 1 else f"llm[{strategy}]"
            variants[name] = ModelVariant(candidate_tf, 0.0, strategy)
            if self.base_candidate.shares is not None:
                for w in BLEND_WEIGHTS:
                    variants[f"{name}+{self.base.name}@{w}"] = ModelVariant(candidate_tf, w, strategy)
        base_on_sample = Precomputed(self.base_candidate, sample)
        key = job.task_type.prediction_key

        def answer_with(v: ModelVariant):
            def predict(cases: Sequence[Any]) -> list[Any]:
                records = predictions(cases, v.tf, key, answered[v.strategy], base_on_sample, v.blend)
                return [r[key] for r in records]

            return predict

        blends = [n for n, v in variants.items() if v.blend > 0]
        choice = choose_with_model(
            self.base_candidate,
            {n: answer_with(v) for n, v in variants.items()},
            sample,
            self._metric,
            blends=blends,
            per_field=self._per_field,
        )
        self.summary.choice["model"] = choice.as_dict()
        self.summary.choice["chosen"] = choice.chosen
        if choice.chosen == self.base.name:
            log.warning("%s beat the model on validation: the test set is answered without the model", self.base.name)
            backend.close()
            self.ask_model = False
            return
        if choice.sources:  # a per-field mix: the model answers, the base keeps its positions
            self.model_fields = tuple(src != self.base.name for src in choice.sources)
            chosen = variants[next(src for src in choice.sources if src != self.base.name)]
        else:
            chosen = variants[choice.chosen]
        self.blend = chosen.blend
        if chosen.tf != tf:
            self.tf = chosen.tf
            self.builder = self._builder(self.tf, self.n_ctx)

    def _answer_validation(
        self, sample: list[Any], tf: Taskfile, backend: Backend
    ) -> tuple[dict[str, CaseAnswer], list[Any], bool]:
        """The model's answers to the validation sample, in chunks; stops early (and shortens the
        sample) when the test set would no longer fit the time budget at the measured rate."""
        builder = self._builder(tf, self.n_ctx)
        chunk = max(4, 2 * backend.n_seq)
        answers: dict[str, CaseAnswer] = {}
        started, done = self.budget.clock(), 0
        while done < len(sample):
            part, stats = answer_cases(sample[done : done + chunk], builder, backend, chunk_size=chunk)
            answers.update(part)
            if stats.interrupted:
                return answers, sample[:done], True
            done = min(done + chunk, len(sample))
            per_case = (self.budget.clock() - started) / done
            left = self.budget.seconds_left()
            if left is not None and per_case * (len(self.job.test) + len(sample) - done) > left:
                log.warning(
                    "time budget: validation stops after %d of %d cases (%.1f s a report)", done, len(sample), per_case
                )
                break
        return answers, sample[:done], False

    def generate(self) -> None:
        """Answer every test report with the model, resuming what the journal already holds."""
        if not (self.ask_model and self.job.test):
            return
        journal = self._journal()
        done = journal.load() if journal else {}
        backend = self._start(self.n_ctx)
        if backend.n_ctx is not None and backend.n_ctx < self.n_ctx:
            self.n_ctx = self.builder.context_limit = backend.n_ctx  # the engine had to settle for less
            self.summary.n_ctx = self.n_ctx
        interactive = sys.stderr.isatty()

        def finished(answer: CaseAnswer) -> None:
            bar.update(1)
            if journal:
                journal.append(answer)

        # A line every 30 s in platform logs; live on a terminal.
        with tqdm(
            total=len(self.job.test), unit="report", file=sys.stderr, mininterval=0.5 if interactive else 30
        ) as bar:
            bar.update(sum(1 for c in self.job.test if c.is_blank or c.uid in done))
            try:
                # Chunks of several times N keep the batched engine's sequences busy between the refills.
                self.answers, stats = answer_cases(
                    self.job.test,
                    self.builder,
                    backend,
                    on_result=finished,
                    budget=self.budget,
                    done=done,
                    chunk_size=max(32, 4 * backend.n_seq),
                )
            finally:
                if journal:
                    journal.close()
        self.summary.record_generation(stats)
        self.summary.engine = backend.figures()
        backend.close()
        if stats.truncated:
            log.warning(
                "%d reports were cut on the %s to fit the context",
                stats.truncated,
                self.job.config.recommended_truncation_side,
            )
        log.info("%d solved examples shown in %d prompts", stats.examples, len(self.job.test) - stats.blank)

    def post_process(self) -> None:
        self.records = predictions(
            self.job.test,
            self.tf,
            self.job.task_type.prediction_key,
            self.answers,
            self.base,
            self.blend,
            on_failure=self.summary.count_failure,
            model_fields=self.model_fields,
        )

    def verify(self) -> None:
        self.adapter.verify(self.records, self.job)

    def write(self) -> None:
        self.summary.predictions = ", ".join(
            str(p) for p in self.adapter.write(self.records, self.job, self.settings.output)
        )

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    # --- helpers ------------------------------------------------------------------------------

    @property
    def _per_field(self) -> bool:
        """Whether the validation choice may mix candidates per label position."""
        return self.job.task_type.multi and not self.job.task_type.is_ner

    def _metric(self, truths: Sequence[Any], values: Sequence[Any]) -> float:
        """DRAGON's metric for this task."""
        return task_score(self.job.task_type, truths, values, task_name=self.job.config.task_name)

    def _start(self, n_ctx: int) -> Backend:
        assert self.backend is not None
        return self.backend.start(n_ctx)

    def _builder(self, tf: Taskfile, context_limit: int) -> PromptBuilder:
        """A prompt builder for the Taskfile's example strategy, in the given context."""
        picker = example_picker(tf.examples.strategy, tf.examples.k, self.job.train, self.job.task_type, self.retriever)
        return PromptBuilder(
            tf,
            self.tokenizer,
            truncation_side=self.job.config.recommended_truncation_side,
            context_limit=context_limit,
            examples=picker,
        )

    def _journal(self) -> Journal | None:
        """The checkpoint journal of this exact job, model, Taskfile and settings."""
        if not self.settings.journal:
            return None
        try:
            check_output_dir(self.settings.work_dir)
        except JobError as err:
            log.warning("%s; running without the checkpoint journal", err)
            return None
        s = self.settings
        answer_settings = (s.examples, s.k, s.reasoning, s.translate, s.n_ctx)
        files = [*self.adapter.input_files(self.job), *CODE_FILES]
        key = journal_key(
            self.summary.backend, self.summary.model_sha256, self.tf.digest(), answer_settings, files=files
        )
        return Journal(s.work_dir / f"{self.job.config.task_name}-{key[:16]}.jsonl")


def predictions(
    cases: Sequence[Any],
    tf: Taskfile,
    key: str,
    answers: dict[str, CaseAnswer],
    fallback: Fallback,
    blend: float,
    *,
    on_failure: Any = None,
    model_fields: Sequence[bool] | None = None,
) -> list[dict[str, Any]]:
    """One record per case: the model's answer post-processed (and blended with the fallback's
    label shares when asked), or the fallback's answer; with `model_fields` (a per-field mix)
    the fallback answers the positions marked False."""
    records = []
    for case in cases:
        answer = answers.get(case.uid)
        value = None
        if answer is not None and answer.ok:
            try:
                value = to_prediction(answer.answer, answer.likelihoods, tf, case.parts)
                shares = fallback.shares(case) if blend > 0 else None
                if shares is not None:
                    value = blend_with_vote(value, answer.likelihoods, fallback(case), shares, blend, tf)
                if model_fields is not None:
                    base = fallback(case)
                    value = [v if own else b for v, b, own in zip(value, base, model_fields, strict=True)]
            except (ValueError, KeyError, TypeError) as err:
                log.warning("uid %s: answer could not be post-processed (%s); using the fallback", case.uid, err)
                if on_failure:
                    on_failure()
        if value is None:
            value = fallback(case)
        records.append({"uid": case.uid, key: value})
    return records
