"""The batched llama.cpp backend: many reports decoded together, the shared prompt prefix once.

Same answers as `LlamaEngine` (greedy decoding under the JSON-schema grammar, label likelihoods
at each scored field's value start, the most likely literal written), computed for up to N
reports at a time through llama.cpp's batch API:

* Each step evaluates, for every active sequence, what it needs next: a chunk of its prompt, the
  token it just chose, the forced tokens of a scored literal, or one candidate literal being
  scored. Finished sequences are replaced by waiting requests at the next step (continuous
  refill), and results are yielded as they finish.
* The KV cache is split per sequence (`kv_unified=False`: attention only over a sequence's own
  cells). The token prefix the requests of a call share (instructions, template) is evaluated
  once in its own sequence and copied into each new request's sequence with
  `llama_memory_seq_cp`; it stays cached between calls, so a retry round reuses it.
* One grammar sampler per sequence (a clone of the schema's compiled grammar). The greedy token
  is checked alone; when the grammar rejects it, the top 64, then the top 2048 tokens are
  checked, and the whole vocabulary only when none of those is allowed: the chosen token is
  always the one a full scan would choose.
* Candidate literals are scored in the sequence's own cache at the decision point (one literal
  per step, then removed with `llama_memory_seq_rm`), so the likelihoods are the quantities
  `LlamaEngine` computes: first token from the current logits, further tokens evaluated; the
  chosen literal is then evaluated as one piece, as `LlamaEngine` does.

Same numbers, not only the same method. llama.cpp's CPU kernels round differently when a physical
batch holds one token than when it holds several (a different matrix-product path; the 8-bit
re-quantisation of activations turns the tiny difference into ~0.1-0.5 in the logits), and a
sequence's tokens are split across physical batches by how many tokens each sequence brings. The
CPU plan (`exact=True`, the default without a GPU) therefore evaluates each sequence's tokens in
the shapes LlamaEngine uses: one call per step with every one-token feed (all decoding sequences,
one token each, as LlamaEngine decodes), then one call per longer feed (a prompt chunk, a forced
literal, a multi-token candidate), never leaving a lone prompt token. On a CPU the results are
then identical to LlamaEngine's and independent of N and of which requests share a batch. The
GPU plan (`exact=False`) puts everything in one `llama_decode` per step and feeds forced literals
one token per step, the fewest passes over the weights; GPU kernels round by batch size anyway.
Context parameters mirror what the high-level `Llama` sets (flash attention off, the same
RoPE/YaRN fields, threads), because llama.cpp's own defaults differ and change the logits.

Defaults: N (parallel sequences) is `EngineOptions.n_seq` or, when 0, 8 on a CPU and 16 on a GPU,
lowered so that the KV cache of N + 1 sequences fits in half the free memory. `EngineOptions.n_ctx`
is the context of each sequence (prompt + output), as for `LlamaEngine`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from llama_cpp import _internals, llama_cpp
from llama_cpp._logger import set_verbose
from llama_cpp._utils import suppress_stdout_stderr

from extractor.backend import Request, Result, check_stop
from extractor.engine import (
    EngineError,
    EngineOptions,
    EngineStats,
    GrammarSampler,
    LlamaChat,
    _at_value,
    _log_softmax,
    available_cores,
    gpu_layers,
    no_room,
    nvidia_gpu_visible,
)

log = logging.getLogger(__name__)

DEFAULT_N_SEQ_CPU = 8
DEFAULT_N_SEQ_GPU = 16
PREFILL_CHUNK = 512  # prompt tokens per step, across all sequences (also the physical batch)
FEED_PER_SEQ = 32  # batch room per sequence for decode / forced / candidate tokens
MIN_SHARED_PREFIX = 16  # tokens a request must share with the others to use the shared prefix

# Slot phases
_PROMPT, _GEN, _SCORE = 0, 1, 2


@dataclass
class _Variant:
    literal: str
    tokens: list[int]
    logp: float


@dataclass
class _Slot:
    """One sequence of the batch and the request it is answering."""

    seq: int
    req: Request
    tokens: list[int]
    budget: int
    grammar: Any
    n_past: int
    pending: list[int]  # prompt tokens still to evaluate
    scored: list[tuple[str, tuple[str, ...]]]
    terminators: dict[str, str]
    phase: int = _PROMPT
    feed: list[int] = field(default_factory=list)  # generated/forced tokens to evaluate next step
    out: list[int] = field(default_factory=list)
    text: bytes = b""
    likelihoods: dict[str, dict[str, float]] = field(default_factory=dict)
    # scoring state
    field_name: str = ""
    variants: list[_Variant] = field(default_factory=list)
    queue: list[_Variant] = field(default_factory=list)
    decision_logits: np.ndarray | None = None


@dataclass
class _Prepared:
    req: Request
    tokens: list[int]
    budget: int


def kv_bytes_per_token(model: Any, metadata: Mapping[str, str]) -> int:
    """F16 K and V cache bytes one token takes in every layer."""
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_head = max(llama_cpp.llama_model_n_head(model), 1)
    n_head_kv = llama_cpp.llama_model_n_head_kv(model) or n_head
    arch = metadata.get("general.architecture", "")
    n_embd = llama_cpp.llama_model_n_embd(model)
    k_len = int(metadata.get(f"{arch}.attention.key_length", n_embd // n_head))
    v_len = int(metadata.get(f"{arch}.attention.value_length", k_len))
    return n_layer * n_head_kv * (k_len + v_len) * 2


def free_memory_bytes(on_gpu: bool) -> int | None:
    """Free GPU memory (from nvidia-smi) or available RAM; None when unknown."""
    if on_gpu:
        visible = nvidia_gpu_visible()
        if visible:
            try:
                free_mib = min(int(line.split(",")[2].split()[0]) for line in visible.splitlines())
                return free_mib << 20
            except (IndexError, ValueError):
                return None
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except OSError:
        return None
    return None


def choose_n_seq(requested: int, on_gpu: bool, n_ctx_seq: int, kv_per_token: int, free: int | None) -> int:
    """N: the flag when given, else 8 (CPU) / 16 (GPU), capped so N + 1 caches fit half the free memory."""
    if requested > 0:
        return min(requested, llama_cpp.llama_max_parallel_sequences() - 1)
    n = DEFAULT_N_SEQ_GPU if on_gpu else DEFAULT_N_SEQ_CPU
    if free:
        per_seq = max(n_ctx_seq * kv_per_token, 1)
        n = max(1, min(n, free // 2 // per_seq - 1))
    return n


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if diff.size else n


class BatchedLlamaEngine:
    """A llama.cpp model behind the Backend interface, N sequences decoded together."""

    name = "llama-batched"

    def __init__(
        self,
        model_path: Path,
        options: EngineOptions,
        n_seq: int | None = None,
        *,
        exact: bool | None = None,
    ) -> None:
        self.options = options
        self._stack = contextlib.ExitStack()
        n_threads = options.n_threads or available_cores()
        start = time.perf_counter()
        set_verbose(False)  # what Llama(verbose=False) does: llama.cpp's own log lines stay quiet
        try:
            n_gpu = gpu_layers(options)
            mparams = llama_cpp.llama_model_default_params()
            mparams.n_gpu_layers = 0x7FFFFFFF if n_gpu == -1 else n_gpu
            mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
            self._model = self._stack.enter_context(
                contextlib.closing(_internals.LlamaModel(path_model=str(model_path), params=mparams, verbose=False))
            )
        except ValueError as err:
            self._stack.close()
            raise EngineError(f"cannot load {model_path}: {err}") from err
        try:
            self._setup(model_path, options, n_seq, exact, n_gpu, n_threads)
        except BaseException:
            self._stack.close()
            raise
        log.info(
            "loaded %s in %.1fs: %d parallel sequences of %d tokens, %d threads%s",
            Path(model_path).name,
            time.perf_counter() - start,
            self.n_seq,
            self.n_ctx_seq,
            n_threads,
            ", GPU" if self.on_gpu else "",
        )

    def _setup(
        self,
        model_path: Path,
        options: EngineOptions,
        n_seq: int | None,
        exact: bool | None,
        n_gpu: int,
        n_threads: int,
    ) -> None:
        self.chat = LlamaChat(self._model)
        model = self._model.model
        self.vocab = self._model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.on_gpu = n_gpu != 0
        self.exact = (not self.on_gpu) if exact is None else exact
        self.n_ctx_seq = -(-max(options.n_ctx, 256) // 256) * 256  # llama.cpp pads it to 256
        kv_tok = kv_bytes_per_token(model, self._model.metadata())
        requested = n_seq if n_seq is not None else options.n_seq
        self.n_seq = choose_n_seq(requested, self.on_gpu, self.n_ctx_seq, kv_tok, free_memory_bytes(self.on_gpu))
        self.prefix_seq = self.n_seq  # the shared prefix lives in its own sequence, after the slots
        n_ctx_total = self.n_ctx_seq * (self.n_seq + 1)
        self.capacity = min(PREFILL_CHUNK + FEED_PER_SEQ * self.n_seq, n_ctx_total)
        self.prefill_chunk = min(PREFILL_CHUNK, self.capacity)

        cparams = llama_cpp.llama_context_default_params()
        # What llama_cpp.Llama sets (the C defaults differ: flash attention auto, 4 threads, YaRN -1).
        cparams.n_ctx = n_ctx_total
        cparams.n_batch = self.capacity
        cparams.n_ubatch = self.prefill_chunk
        cparams.n_seq_max = self.n_seq + 1
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.rope_scaling_type = llama_cpp.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
        cparams.attention_type = llama_cpp.LLAMA_ATTENTION_TYPE_UNSPECIFIED
        cparams.rope_freq_base = 0
        cparams.rope_freq_scale = 0
        cparams.yarn_ext_factor = -1.0
        cparams.yarn_attn_factor = 1.0
        cparams.yarn_beta_fast = 32.0
        cparams.yarn_beta_slow = 1.0
        cparams.yarn_orig_ctx = 0
        cparams.embeddings = False
        cparams.offload_kqv = True
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.no_perf = False
        cparams.kv_unified = False
        try:
            with suppress_stdout_stderr(disable=False):
                self._ctx = self._stack.enter_context(
                    contextlib.closing(_internals.LlamaContext(model=self._model, params=cparams, verbose=False))
                )
        except ValueError as err:
            raise EngineError(
                f"cannot create a context of {self.n_seq + 1} x {self.n_ctx_seq} tokens for {model_path}: {err}"
            ) from err
        self.ctx = self._ctx.ctx
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.n_ctx = self.n_ctx_seq  # what one request may use, as LlamaEngine.n_ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        self._stack.callback(llama_cpp.llama_batch_free, self._batch)
        cap = self.capacity
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(cap,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(cap,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(cap,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(cap,))
        self._b_nseq[:] = 1

        self.stats = EngineStats()
        self.stats.extra.update(
            n_seq=self.n_seq,
            n_ctx_seq=self.n_ctx_seq,
            steps=0,
            calls=0,
            batch_tokens=0,
            topk_grammar_applies=0,
            stream_copies=0,
        )
        self.sampler = GrammarSampler(self.vocab, self.n_vocab, self.stats)
        self._live: dict[int, Any] = {}
        self._variant_tokens: dict[str, list[int]] = {}
        self._prefix: np.ndarray = np.zeros(0, dtype=np.intc)
        self.closed = False

    # -- grammar -------------------------------------------------------------------------------

    def check_schema(self, schema: Mapping[str, Any]) -> None:
        """Build the grammar for a schema now, so a bad schema fails at start-up."""
        self.sampler.compiled(schema)

    def _clone(self, sampler: Any) -> Any:
        clone = llama_cpp.llama_sampler_clone(sampler)
        if not clone:
            raise EngineError("llama.cpp could not clone a grammar sampler")
        self._live[id(clone)] = clone
        return clone

    def _free(self, sampler: Any) -> None:
        if sampler is not None and self._live.pop(id(sampler), None) is not None:
            llama_cpp.llama_sampler_free(sampler)

    def _tokens_of(self, text: str) -> list[int]:
        toks = self._variant_tokens.get(text)
        if toks is None:
            toks = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            self._variant_tokens[text] = toks
        return toks

    # -- KV sequences --------------------------------------------------------------------------

    def _row(self, i: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise RuntimeError(f"no logits for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _decode(self, n: int) -> None:
        check_stop()
        self._batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _put(self, at: int, tokens: Sequence[int], seq: int, pos: int, logits: str) -> int:
        """Write tokens of one sequence into the batch at row `at`; returns the next free row."""
        n = len(tokens)
        self._b_token[at : at + n] = tokens
        self._b_pos[at : at + n] = np.arange(pos, pos + n, dtype=np.int32)
        self._b_logits[at : at + n] = 1 if logits == "all" else 0
        if logits == "last":
            self._b_logits[at + n - 1] = 1
        seq_ids = self._batch.seq_id
        for i in range(at, at + n):
            seq_ids[i][0] = seq
        return at + n

    def _set_prefix(self, tokens: np.ndarray) -> None:
        """Make the prefix sequence hold exactly `tokens`, evaluating only what it lacks."""
        keep = _lcp(self._prefix, tokens)
        if keep < len(self._prefix):
            llama_cpp.llama_memory_seq_rm(self.mem, self.prefix_seq, keep, -1)
        self._prefix = self._prefix[:keep]
        todo = tokens[keep:]
        t0 = time.perf_counter()
        starts = list(range(0, len(todo), self.prefill_chunk))
        if len(starts) > 1 and len(todo) - starts[-1] == 1:
            starts[-1] -= 1  # no one-token piece (see _chunk)
        for i, j in zip(starts, [*starts[1:], len(todo)][: len(starts)], strict=True):
            chunk = todo[i:j].tolist()
            n = self._put(0, chunk, self.prefix_seq, keep + i, "last")
            try:
                self._decode(n)
            except RuntimeError:
                llama_cpp.llama_memory_seq_rm(self.mem, self.prefix_seq, -1, -1)
                self._prefix = np.zeros(0, dtype=np.intc)
                raise
            self._prefix = tokens[: keep + i + len(chunk)]
        self.stats.prefill_s += time.perf_counter() - t0
        self.stats.prompt_tokens_evaluated += len(todo)

    def _move(self, slot: _Slot, seq: int) -> None:
        """Renumber a slot's sequence (whole-stream copy), keeping active sequences contiguous."""
        llama_cpp.llama_memory_seq_cp(self.mem, slot.seq, seq, -1, -1)
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        self.stats.extra["stream_copies"] += 1
        slot.seq = seq

    # -- the Backend interface -----------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> Iterator[Result]:
        if self.closed:
            raise RuntimeError("the engine is closed")
        prepared: list[_Prepared] = []
        for req in requests:
            try:
                tokens = self.chat.tokenize(req.prompt)
                budget = min(req.max_tokens, self.n_ctx_seq - len(tokens) - 1)
                if budget <= 0:
                    yield no_room(req.uid, len(tokens))
                    continue
                if req.schema:
                    self.sampler.compiled(req.schema)
            except (RuntimeError, ValueError) as err:
                log.warning("uid %s: generation failed: %s", req.uid, err)
                yield Result(uid=req.uid, text="", error=f"engine error: {err}")
                continue
            prepared.append(_Prepared(req, tokens, budget))
        if not prepared:
            return

        arrays = [np.asarray(p.tokens, dtype=np.intc) for p in prepared]
        first = arrays[0]
        # Every request keeps at least two prompt tokens of its own: a lone token would be
        # evaluated in a one-token physical batch (see the module docstring).
        shared = [min(_lcp(first, a), len(a) - 2, len(first) - 2) for a in arrays[1:]]
        shared = [s for s in shared if s >= MIN_SHARED_PREFIX]
        if shared:
            p_len = min(shared)
        elif len(arrays) == 1:
            p_len = max(len(first) - 2, 0)  # one request: its prompt stays cached for the next call
        else:
            p_len = 0
        try:
            self._set_prefix(first[:p_len])
        except RuntimeError as err:
            log.warning("shared prefix could not be evaluated (%s); prefilling every prompt in full", err)
            p_len = 0

        waiting = deque(zip(prepared, arrays, strict=True))
        slots: list[_Slot | None] = [None] * self.n_seq
        try:
            yield from self._run(waiting, slots, p_len)
        finally:
            for i, slot in enumerate(slots):
                if slot is not None:
                    self._free(slot.grammar)
                    slots[i] = None
            for seq in range(self.n_seq):
                llama_cpp.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def _run(self, waiting: deque, slots: list[_Slot | None], p_len: int) -> Iterator[Result]:
        prefix = self._prefix
        while waiting or any(s is not None for s in slots):
            done: list[Result] = []
            # Refill free sequences, lowest first; at the tail, keep the active ones contiguous.
            for seq in range(self.n_seq):
                if slots[seq] is not None:
                    continue
                if waiting:
                    prep, arr = waiting.popleft()
                    try:
                        slots[seq] = self._start(seq, prep, arr, p_len, prefix)
                    except (RuntimeError, ValueError) as err:
                        log.warning("uid %s: generation failed: %s", prep.req.uid, err)
                        done.append(Result(uid=prep.req.uid, text="", error=f"engine error: {err}"))
                else:
                    last = max((i for i, s in enumerate(slots) if s is not None), default=-1)
                    if last > seq:
                        slot = slots[last]
                        assert slot is not None
                        self._move(slot, seq)
                        slots[seq], slots[last] = slot, None
            active = [s for s in slots if s is not None]
            if not active:
                yield from done
                continue
            self.stats.extra["steps"] += 1

            calls = self._plan_exact(active) if self.exact else self._plan_mixed(active)
            for entries in calls:
                try:
                    rows = self._evaluate(entries)
                except RuntimeError as err:
                    log.warning("a batch of %d sequences failed: %s", len(entries), err)
                    for s, *_ in entries:
                        if slots[s.seq] is s:
                            done.append(self._fail(slots, s, err))
                    continue
                for s, kind, i0, n in rows:
                    try:
                        result = self._after(s, kind, i0, n)
                    except (RuntimeError, ValueError) as err:
                        log.warning("uid %s: generation failed: %s", s.req.uid, err)
                        done.append(self._fail(slots, s, err))
                        continue
                    if result is not None:
                        slots[s.seq] = None
                        self._free(s.grammar)
                        done.append(result)
            yield from done

    # -- planning and evaluating one step ----------------------------------------------------------

    def _chunk(self, pending: int, budget: int) -> int:
        """Prompt tokens to evaluate now: all that fit, never leaving or taking a lone token
        (a one-token physical batch takes another kernel path and rounds differently)."""
        if pending <= budget:
            return pending
        take = budget - 1 if pending - budget == 1 else budget
        return take if take >= 2 else 0

    def _plan_exact(self, active: list[_Slot]) -> list[list[tuple[_Slot, list[int], str, int]]]:
        """One call with every one-token feed (one token per sequence: decoding, as LlamaEngine
        decodes), then one call per longer feed (a prompt chunk, a forced literal, a multi-token
        candidate), so each sequence's tokens are evaluated in the same shapes LlamaEngine uses
        and the logits come out the same on a CPU."""
        singles: list[tuple[_Slot, list[int], str, int]] = []
        multis: list[tuple[_Slot, list[int], str, int]] = []
        budget = self.prefill_chunk
        for s in active:
            if s.phase == _PROMPT:
                take = self._chunk(len(s.pending), budget)
                if take == 0:
                    continue
                budget -= take
                entry = (s, s.pending[:take], "last" if take == len(s.pending) else "none", _PROMPT)
            elif s.phase == _GEN:
                entry = (s, s.feed, "last", _GEN)
            else:
                entry = (s, s.queue[0].tokens[:-1], "all", _SCORE)
            (singles if len(entry[1]) == 1 else multis).append(entry)
        return ([singles] if singles else []) + [[m] for m in multis]

    def _plan_mixed(self, active: list[_Slot]) -> list[list[tuple[_Slot, list[int], str, int]]]:
        """Everything in one call (fewest passes over the weights: the GPU plan). Forced literals
        go one token per step; every prefilling sequence gets at least one token, so the run of
        sequence ids a physical batch takes is not broken."""
        prompt_slots = [s for s in active if s.phase == _PROMPT]
        room = self.capacity - len(prompt_slots)
        feeds: dict[int, tuple[list[int], str, int]] = {}
        for s in active:
            if s.phase == _PROMPT:
                continue
            if s.phase == _GEN:
                toks, logits = s.feed[:1], ("last" if len(s.feed) == 1 else "none")
            else:
                toks, logits = s.queue[0].tokens[:-1], "all"
            if len(toks) > room:
                continue  # waits for the next step
            feeds[s.seq] = (toks, logits, s.phase)
            room -= len(toks)
        budget = max(0, min(room, self.prefill_chunk - len(prompt_slots)))
        for s in prompt_slots:
            take = 1 + min(len(s.pending) - 1, budget)
            budget -= take - 1
            feeds[s.seq] = (s.pending[:take], "last" if take == len(s.pending) else "none", _PROMPT)
        return [[(s, *feeds[s.seq]) for s in active if s.seq in feeds]]

    def _evaluate(self, entries: list[tuple[_Slot, list[int], str, int]]) -> list[tuple[_Slot, int, int, int]]:
        """Decode one call; its rows per sequence, and the time split by what the tokens were."""
        rows: list[tuple[_Slot, int, int, int]] = []
        at = 0
        n_kind = [0, 0, 0]
        for s, toks, logits, kind in entries:
            rows.append((s, kind, at, len(toks)))
            at = self._put(at, toks, s.seq, s.n_past, logits)
            n_kind[kind] += len(toks)
        if at == 0:
            return rows
        t0 = time.perf_counter()
        self._decode(at)
        dt = time.perf_counter() - t0
        stats = self.stats
        stats.extra["calls"] += 1
        stats.extra["batch_tokens"] += at
        stats.prefill_s += dt * n_kind[_PROMPT] / at
        stats.decode_s += dt * n_kind[_GEN] / at
        stats.scoring_s += dt * n_kind[_SCORE] / at
        stats.prompt_tokens_evaluated += n_kind[_PROMPT]
        return rows

    def _fail(self, slots: list[_Slot | None], s: _Slot, err: Exception) -> Result:
        slots[s.seq] = None
        self._free(s.grammar)
        llama_cpp.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
        return Result(uid=s.req.uid, text="", prompt_tokens=len(s.tokens), error=f"engine error: {err}")

    def _start(self, seq: int, prep: _Prepared, arr: np.ndarray, p_len: int, prefix: np.ndarray) -> _Slot:
        req = prep.req
        llama_cpp.llama_memory_seq_rm(self.mem, seq, -1, -1)
        use_prefix = p_len > 0 and len(arr) > p_len and _lcp(prefix, arr[:p_len]) == p_len
        if use_prefix:
            llama_cpp.llama_memory_seq_cp(self.mem, self.prefix_seq, seq, -1, -1)
            self.stats.extra["stream_copies"] += 1
            self.stats.prompt_tokens_reused += p_len
            n_past = p_len
        else:
            n_past = 0
        fields = list(req.schema.get("properties", {}))
        return _Slot(
            seq=seq,
            req=req,
            tokens=prep.tokens,
            budget=prep.budget,
            grammar=self._clone(self.sampler.compiled(req.schema)) if req.schema else None,  # no schema: free text
            n_past=n_past,
            pending=prep.tokens[n_past:],
            scored=[(name, tuple(req.choices[name])) for name in fields if name in req.choices],
            terminators={name: ("," if i < len(fields) - 1 else "}") for i, name in enumerate(fields)},
        )

    # -- one sequence after a step ---------------------------------------------------------------

    def _after(self, s: _Slot, kind: int, i0: int, n: int) -> Result | None:
        """Take in what the step computed for one sequence; a Result when it is done."""
        if kind == _PROMPT:
            s.n_past += n
            s.pending = s.pending[n:]
            if s.pending:
                return None
            s.phase = _GEN
            return self._advance(s, self._row(i0 + n - 1))
        if kind == _GEN:
            s.n_past += n
            s.feed = s.feed[n:]
            if s.feed:
                return None
            return self._advance(s, self._row(i0 + n - 1))
        # A candidate literal: its tokens after the first, from the rows of the ones before.
        t0 = time.perf_counter()
        v = s.queue.pop(0)
        for j, nxt in enumerate(v.tokens[1:]):
            v.logp += float(_log_softmax(self._row(i0 + j))[nxt])
        self.stats.scoring_s += time.perf_counter() - t0
        llama_cpp.llama_memory_seq_rm(self.mem, s.seq, s.n_past, -1)
        if s.queue:
            return None
        return self._finish_field(s)

    def _advance(self, s: _Slot, logits: np.ndarray, *, check_field: bool = True) -> Result | None:
        """One iteration of LlamaEngine's loop for this sequence, given its current logits."""
        if len(s.out) >= s.budget:
            return self._result(s, finished=False)
        if check_field and s.scored and _at_value(s.text, s.scored[0][0]):
            return self._start_field(s, logits)
        token = self.sampler.pick(s.grammar, logits) if s.grammar is not None else int(np.argmax(logits))
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return self._result(s, finished=True)
        if s.grammar is not None:
            llama_cpp.llama_sampler_accept(s.grammar, token)
        s.out.append(token)
        s.text += self.sampler.piece(token)
        if len(s.out) >= s.budget:
            return self._result(s, finished=False)
        s.feed = [token]
        s.phase = _GEN
        return None

    def _start_field(self, s: _Slot, logits: np.ndarray) -> Result | None:
        """At a scored field's value: first tokens from these logits, the rest queued for evaluation."""
        t0 = time.perf_counter()
        name, literals = s.scored.pop(0)
        logp = _log_softmax(logits)
        prefixes = ("", " ") if s.text.endswith(b":") else ("",)
        s.field_name = name
        s.variants = []
        for literal in literals:
            for prefix in prefixes:
                toks = self._tokens_of(prefix + literal + s.terminators[name])
                s.variants.append(_Variant(literal, toks, float(logp[toks[0]])))
        room = self.n_ctx_seq - s.n_past
        multi = [v for v in s.variants if len(v.tokens) > 1]
        if any(len(v.tokens) - 1 > min(room, self.capacity - self.n_seq) for v in multi):
            raise RuntimeError("no room left in the sequence's context to score the literals")
        s.queue = multi
        s.decision_logits = np.array(logits, copy=True)
        self.stats.scoring_s += time.perf_counter() - t0
        if s.queue:
            s.phase = _SCORE
            return None
        return self._finish_field(s)

    def _finish_field(self, s: _Slot) -> Result | None:
        """Record the field's likelihoods and force the best literal (grammar permitting)."""
        t0 = time.perf_counter()
        into = s.likelihoods.setdefault(s.field_name, {})
        best: _Variant | None = None
        by_literal: dict[str, list[float]] = {}
        for v in s.variants:  # LlamaEngine's order: literals, then "" before " "; first maximum wins
            by_literal.setdefault(v.literal, []).append(v.logp)
            if best is None or v.logp > best.logp:
                best = v
        for literal, values in by_literal.items():
            into[literal] = float(np.logaddexp.reduce(values))
        forced = list(best.tokens) if best is not None else []
        if forced and s.grammar is not None:
            probe = llama_cpp.llama_sampler_clone(s.grammar)
            try:
                for tok in forced:
                    if not self.sampler.allowed(probe, tok):
                        forced = []
                        break
                    llama_cpp.llama_sampler_accept(probe, tok)
            finally:
                llama_cpp.llama_sampler_free(probe)
        self.stats.scoring_s += time.perf_counter() - t0
        logits = s.decision_logits
        s.variants, s.queue, s.decision_logits = [], [], None
        if not forced:
            assert logits is not None
            return self._advance(s, logits, check_field=False)
        forced = forced[: s.budget - len(s.out)]
        for tok in forced:
            if s.grammar is not None:
                llama_cpp.llama_sampler_accept(s.grammar, tok)
            s.text += self.sampler.piece(tok)
        s.out += forced
        if len(s.out) >= s.budget:
            return self._result(s, finished=False)
        s.feed = forced
        s.phase = _GEN
        return None

    def _result(self, s: _Slot, *, finished: bool) -> Result:
        self.stats.output_tokens += len(s.out)
        self.stats.missed_decision_points += len(s.scored)
        return Result(
            uid=s.req.uid,
            text=s.text.decode("utf-8", errors="replace"),
            likelihoods=s.likelihoods,
            prompt_tokens=len(s.tokens),
            output_tokens=len(s.out),
            finished=finished,
        )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sampler in list(self._live.values()):
            llama_cpp.llama_sampler_free(sampler)
        self._live.clear()
        self.sampler.close()
        self._stack.close()
