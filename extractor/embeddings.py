"""The embedding pass: each report becomes one vector, the mean of the model's final hidden states.

The job's own GGUF model reads every report (training, validation and test) in batches of whole
reports, several sequences per `llama_decode`, and `extractor.heads.EmbeddingHead` trains a linear
model on the training vectors. Vectors are cached on disk under the model file's hash and the
report's text, so a rerun does not embed again.

Why the pooling is done here, in numpy, and not by llama.cpp: a context created with
`pooling_type MEAN` aborts the process in the pinned llama.cpp (llama-cpp-python 0.3.36) with
`GGML_ASSERT(ggml_can_mul_mat(a, b))` while it reserves its worst-case graph. Mean pooling is a
matrix product of the transposed hidden states (n_outputs rows) with a mean matrix of n_tokens
rows; `llama_context::graph_reserve` rounds n_tokens up to a multiple of n_seq_max but keeps
n_outputs = min(n_ubatch, n_outputs_max), so whenever n_ubatch is not a multiple of n_seq_max
(512 tokens and 9 sequences, as the generation context has) the shapes differ and ggml asserts.
Even with matching sizes, llama.cpp's mean is per micro-batch: with a KV cache split per sequence
it splits a batch into equal-length pieces, so a report longer than its piece would get the mean
of its last piece only. So the embedding context uses `pooling_type NONE` (every token's final,
normalised hidden state is an output, nothing is pooled in the graph) and a unified KV cache
(one `llama_decode` = the batch in order; attention is still masked per sequence), and the mean
over each report's tokens is taken here. Embedding contexts output every token, so llama.cpp also
computes the output layer for every token (about a quarter more work on the 135M default model,
a few percent on a 14B one); the pinned bindings offer no way around that for decoder models.

Reports are cut to their first `MAX_TOKENS` tokens (`MAX_TOKENS` is the stated cap): the vector
summarises the start of a long report.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from extractor.dragon_io import Job, JobError, atomic_write
from extractor.heads import EmbeddingHead
from extractor.llama_api import Batch, Context, Model, supports_gpu_offload
from extractor.preflight import check_output_dir
from extractor.settings import Settings

log = logging.getLogger(__name__)

MAX_TOKENS = 512  # a report's tokens that are embedded (its first ones)
BATCH_TOKENS_CPU = 512  # tokens per llama_decode: on a CPU, larger batches are no faster per token
BATCH_TOKENS_GPU = 2048
MAX_SEQS = 64  # reports per llama_decode at most
CACHE_CHUNK = 256  # texts embedded between two saves of the cache
VERSION = 1  # part of the cache key: bump when the vectors change meaning
# The embedding pass may take at most this share of the time left (`--time-limit`): past it the
# head is given up (the vectors done stay cached) and the time goes to the model's answers.
EMBED_SHARE = 0.25
KEY_BYTES = 32  # a text's key: the SHA-256 of its UTF-8 bytes


# -- pure parts: packing, pooling, keys ---------------------------------------------------------------


def pack(lengths: Sequence[int], capacity: int, max_seqs: int) -> list[list[int]]:
    """Indices of texts per batch, in order: whole texts, at most `capacity` tokens and `max_seqs`
    texts a batch. A text longer than `capacity` is an error (cut texts to the cap first)."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"text {i} has {n} tokens, more than a batch holds ({capacity})")
        if current and (used + n > capacity or len(current) >= max_seqs):
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches


def mean_pool(rows: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """The mean of consecutive row spans of the given lengths (a zero-length span: zeros)."""
    out = np.zeros((len(lengths), rows.shape[1]), dtype=np.float32)
    at = 0
    for i, n in enumerate(lengths):
        if n:
            out[i] = rows[at : at + n].mean(axis=0, dtype=np.float64)
        at += n
    if at != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows for spans of {at} tokens")
    return out


def model_key(model_sha256: str, max_tokens: int = MAX_TOKENS) -> str:
    """What decides a vector besides its text: the model file, the token cap, this code's version."""
    return hashlib.sha256(f"{model_sha256}\0{max_tokens}\0pooling=mean-none\0v{VERSION}".encode()).hexdigest()


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


# -- the model-facing part -------------------------------------------------------------------------------


@dataclass
class EmbedStats:
    texts: int = 0
    tokens: int = 0
    truncated: int = 0
    decodes: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Embedder:
    """An embedding context on a loaded model: `embedder(texts)` -> (n, dim) float32 mean vectors."""

    def __init__(
        self,
        model: Model,
        *,
        n_threads: int,
        on_gpu: bool,
        max_tokens: int = MAX_TOKENS,
        batch_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.max_tokens = max_tokens
        capacity = batch_tokens or (BATCH_TOKENS_GPU if on_gpu else BATCH_TOKENS_CPU)
        self.capacity = max(capacity, max_tokens)
        self.max_seqs = MAX_SEQS
        self.ctx = Context(
            model,
            n_ctx=-(-self.capacity // 256) * 256,
            n_batch=self.capacity,
            n_ubatch=self.capacity,
            n_seq_max=self.max_seqs,
            n_threads=n_threads,
            embeddings=True,
            kv_unified=True,
        )
        self.batch = Batch(self.capacity)
        self.stats = EmbedStats()

    def tokens(self, text: str) -> list[int]:
        """The tokens embedded for a text: BOS when the model adds one, the text as text (a control
        token written in a report stays text), cut to the cap."""
        toks = ([self.model.bos] if self.model.add_bos else []) + self.model.tokenize(text, special=False)
        if len(toks) > self.max_tokens:
            self.stats.truncated += 1
            toks = toks[: self.max_tokens]
        return toks

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        dim = int(self.model.n_embd())
        out = np.zeros((len(texts), dim), dtype=np.float32)
        toks = [self.tokens(t) for t in texts]
        start = time.perf_counter()
        for group in pack([len(t) for t in toks], self.capacity, self.max_seqs):
            group = [i for i in group if toks[i]]  # a text without tokens keeps a zero vector
            if not group:
                continue
            at = 0
            for seq, i in enumerate(group):
                at = self.batch.put(at, toks[i], seq, 0, "all")
            self.ctx.decode(self.batch, at)
            rows = self.ctx.token_embeddings(at)
            out[group] = mean_pool(rows, [len(toks[i]) for i in group])
            self.ctx.clear()
            self.stats.decodes += 1
            self.stats.tokens += at
        self.stats.seconds += time.perf_counter() - start
        self.stats.texts += len(texts)
        return out

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()


# -- the cache ------------------------------------------------------------------------------------------


@dataclass
class CachedEmbedder:
    """Vectors by (model key, text): in memory, and in `path` when given (an .npz rewritten whole
    after every chunk of new vectors, so an interrupted pass keeps what it finished). `embed` may
    be None once every text needed is cached (the model is then closed)."""

    embed: Callable[[Sequence[str]], np.ndarray] | None
    path: Path | None = None
    seconds_left: Callable[[], float | None] | None = None  # the job's time budget, if it has one
    clock: Callable[[], float] = time.perf_counter
    hits: int = 0
    misses: int = 0
    _vectors: dict[bytes, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path is not None and self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    keys, vectors = data["keys"], data["vectors"]
                if keys.ndim != 2 or keys.shape[1] != KEY_BYTES or keys.shape[0] != vectors.shape[0]:
                    raise ValueError(f"keys of shape {keys.shape} for {vectors.shape[0]} vectors")
                self._vectors = {k.tobytes(): v for k, v in zip(keys, vectors, strict=True)}
                log.info("embedding cache %s: %d vectors", self.path, len(self._vectors))
            except (OSError, ValueError, KeyError) as err:
                log.warning("embedding cache %s unreadable (%s); embedding again", self.path, err)
                self._vectors = {}

    def missing(self, texts: Sequence[str]) -> int:
        """How many distinct texts are not cached yet."""
        return len({k for k in map(text_key, texts) if k not in self._vectors})

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        keys = [text_key(t) for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in self._vectors))
        todo_set = set(todo)
        self.hits += sum(1 for k in keys if k not in todo_set)
        if todo:
            if self.embed is None:
                raise RuntimeError(f"{len(todo)} texts are not in the embedding cache and no model is open")
            by_key = {k: t for k, t in zip(keys, texts, strict=True)}
            started = self.clock()
            for at in range(0, len(todo), CACHE_CHUNK):
                self._check_budget(started, at, len(todo))
                chunk = todo[at : at + CACHE_CHUNK]
                vectors = np.asarray(self.embed([by_key[k] for k in chunk]), dtype=np.float32)
                if vectors.shape[0] != len(chunk):
                    raise ValueError(f"the embedder returned {vectors.shape[0]} vectors for {len(chunk)} texts")
                self._vectors.update(zip(chunk, vectors, strict=True))
                self.misses += len(chunk)
                self._save()
        return np.stack([self._vectors[k] for k in keys]) if keys else np.zeros((0, 0), dtype=np.float32)

    def _check_budget(self, started: float, done: int, total: int) -> None:
        """Raise TimeoutError when the texts left, at the rate so far, would take more than
        EMBED_SHARE of the time left."""
        left = self.seconds_left() if self.seconds_left is not None and done else None
        if left is None:
            return
        projected = (self.clock() - started) / done * (total - done)
        if projected > EMBED_SHARE * left:
            raise TimeoutError(
                f"embedding {total - done} more reports would take about {projected:.0f} s, more than "
                f"{EMBED_SHARE:.0%} of the {left:.0f} s left ({done} embedded and cached)"
            )

    def _save(self) -> None:
        if self.path is None:
            return
        buf = io.BytesIO()
        keys = list(self._vectors)
        # Keys as raw bytes in a uint8 array: numpy's "S" strings drop trailing NUL bytes.
        raw = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        np.savez(buf, keys=raw, vectors=np.stack([self._vectors[k] for k in keys]))
        try:
            atomic_write(self.path, buf.getvalue())
        except JobError as err:
            log.warning("%s; the embedding cache stays in memory", err)
            self.path = None


def cache_path(work_dir: Path, key: str) -> Path:
    return Path(work_dir) / f"embeddings-{key[:16]}.npz"


# -- the pipeline's entry points -------------------------------------------------------------------------


def embedding_head_wanted(setting: str, gpu: str) -> bool:
    """`--embedding-head`: on, off, or auto = on when llama.cpp can offload to a GPU and `--gpu` is
    not off (on 2 CPU cores a synthetic job's 1,500 reports take many minutes to embed)."""
    if setting != "auto":
        return setting == "on"
    return gpu != "off" and supports_gpu_offload()


def train_embedding_head(
    job: Job,
    model_path: Path,
    model_sha256: str,
    settings: Settings,
    seed: int,
    seconds_left: Callable[[], float | None] | None = None,
) -> EmbeddingHead | None:
    """The embedding head for a job, or None with a log line (NER, too few records, a failure:
    the other candidates still answer)."""
    if job.task_type.is_ner:
        log.info("embedding head: not for NER tasks")
        return None
    try:
        embed = embed_job(job, model_path, model_sha256, settings, seconds_left)
        return EmbeddingHead(embed).fit(job.train, job.task_type, seed=seed)
    except Exception as err:  # noqa: BLE001 - one failed candidate must not end the job
        log.warning("the embedding head could not be trained (%s); the other candidates remain", err)
        return None


def embed_job(
    job: Job,
    model_path: Path,
    model_sha256: str,
    settings: Settings,
    seconds_left: Callable[[], float | None] | None = None,
) -> CachedEmbedder:
    """Every report of the job embedded (training, validation and test: the head predicts the last
    two later, from the cache, after the model is closed). The model is loaded only when some
    report is not cached yet; the cache lives in the work folder when it is writable."""
    from extractor.engine import EngineOptions, available_cores, gpu_layers  # engine imports this module

    path = cache_path(settings.work_dir, model_key(model_sha256))
    try:
        check_output_dir(settings.work_dir)
    except JobError as err:
        log.warning("%s; the embedding cache stays in memory", err)
        path = None
    cache = CachedEmbedder(None, path, seconds_left)
    texts = [c.content for c in (*job.train, *job.validation, *job.test)]
    if not cache.missing(texts):
        log.info("embedding pass: all %d reports cached in %s", len(texts), path)
        return cache
    n_gpu = gpu_layers(EngineOptions(gpu=settings.gpu, allow_cpu=settings.allow_cpu))
    model = Model(Path(model_path), n_gpu_layers=n_gpu)
    try:
        embedder = Embedder(model, n_threads=settings.threads or available_cores(), on_gpu=n_gpu != 0)
        try:
            cache.embed = embedder
            cache(texts)
        finally:
            cache.embed = None
            embedder.close()
    finally:
        model.close()
    s = embedder.stats
    log.info(
        "embedding pass: %d reports, %d tokens in %.1f s (%.0f tokens/s, %.3f s a report), %d cut to %d tokens",
        s.texts, s.tokens, s.seconds, s.tokens_per_s, s.seconds / max(s.texts, 1), s.truncated, MAX_TOKENS,
    )  # fmt: skip
    return cache
