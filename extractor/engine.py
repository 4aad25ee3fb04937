"""The llama.cpp backend: N reports decoded together, the shared prompt prefix evaluated once.

Answers are greedy under a JSON grammar built from the answer schema, with label likelihoods at
each scored field's value start and the most likely literal written (the per-sequence logic is
`extractor.decoder.Decoder`, tested without a model). This module is the scheduler around the
decoders, as llama.cpp's server splits slots from its step loop; every call into llama.cpp goes
through `extractor.llama_api`.

* Each step evaluates, for every active sequence, what its decoder feeds next: a chunk of its
  prompt, the token it just chose with the run the grammar then allows in one way only (the rest of
  a key, a terminator: the decoder's forced runs), the forced tokens of a scored literal, or one
  candidate literal being scored. A forced run is one multi-token feed, so the steps an answer
  takes are the ones where the model chooses (`answer_steps` / `answers` in the stats).
  Finished sequences are replaced by waiting requests at the next step (continuous refill), and
  results are yielded as they finish. `--parallel 1` is the same loop with one slot.
* The KV cache is split per sequence (attention only over a sequence's own cells). The token
  prefix the requests of a call share (instructions, template) is evaluated once in its own
  sequence and copied into each new request's sequence; it stays cached between calls, so the
  next chunk and a retry round reuse it.

Same numbers whatever N is. llama.cpp's CPU kernels round differently when a physical batch holds
one token than when it holds several (another matrix-product path; the 8-bit re-quantisation of
activations turns the tiny difference into ~0.1-0.5 in the logits), and a sequence's tokens are
split across physical batches by how many tokens each sequence brings. The CPU plan (`exact=True`,
the default without a GPU) therefore evaluates each sequence's tokens in fixed shapes: one call per
step with every one-token feed, then one call per longer feed (a prompt chunk, a forced literal or run, a
multi-token candidate), never leaving a lone prompt token. On a CPU the results are then
independent of N and of which requests share a batch. The GPU plan (`exact=False`) puts
everything in one `llama_decode` per step, forced runs whole, the fewest passes over the weights;
GPU kernels round by batch size anyway.

Defaults: N (parallel sequences) is `EngineOptions.n_seq` or, when 0, 8 on a CPU and 16 on a GPU,
lowered so that the KV cache of N + 1 sequences fits in half the free memory. `EngineOptions.n_ctx`
is the context of each sequence (prompt + output).

The embedding pass (pooled hidden-state vectors for trained heads): `Engine.embed`, a context of
its own with embeddings on, whole reports packed into each batch and mean-pooled in numpy
(`extractor.embeddings`, which also says why llama.cpp's own mean pooling is not used).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from extractor.backend import Message, Request, Result, check_stop
from extractor.decoder import Decoder, EngineStats, Feed, Phase, byte_probe
from extractor.embeddings import Embedder
from extractor.llama_api import (
    Batch,
    Context,
    EngineError,
    Grammar,
    GrammarScratch,
    Model,
    chat_formatter,
    max_parallel_sequences,
    schema_to_gbnf,
    supports_gpu_offload,
)

__all__ = ["Engine", "EngineError", "EngineOptions", "EngineStats", "LlamaChat"]

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_N_SEQ_CPU = 8
DEFAULT_N_SEQ_GPU = 16
PREFILL_CHUNK = 512  # prompt tokens per step, across all sequences (also the physical batch)
FEED_PER_SEQ = 32  # batch room per sequence for decode / forced / candidate tokens
MIN_SHARED_PREFIX = 16  # tokens a request must share with the others to use the shared prefix


# -- options and the machine ----------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    n_ctx: int = 4096  # per sequence: prompt + output
    n_threads: int = 0  # 0: all cores
    n_batch: int = 512  # kept for callers; the prompt chunk is PREFILL_CHUNK
    gpu: str = "auto"  # "auto" | "on" | "off"
    allow_cpu: bool = False
    seed: int = 0  # greedy decoding draws nothing; kept for the journal key
    n_seq: int = 0  # sequences decoded together (0: automatic, 1: one report at a time)


SPACE_RULE = re.compile(r"^space ::= .*$", re.MULTILINE)
STRING_CHAR = r'char ::= [^"\\]'  # the converter's: any character but a quote or a backslash
JSON_STRING_CHAR = r'char ::= [^"\\\x00-\x1F]'  # ... nor a control character, which JSON must escape


def schema_to_grammar(schema: Mapping[str, Any]) -> str:
    """GBNF for a JSON schema that allows compact JSON only, as the prompts' examples are written.
    The converter allows an optional space around every key and value: a choice that carries
    nothing of the answer yet costs a decode step wherever the model makes it. Without it the
    scaffolding between values is forced, and fed in one step. Strings exclude raw control
    characters (a newline), which the converter allows and a JSON parser rejects. A schema the
    converter cannot handle is an error, not a fallback."""
    try:
        gbnf = schema_to_gbnf(orjson.dumps(schema).decode())
    except Exception as err:  # noqa: BLE001 - the converter raises bare Exceptions
        raise EngineError(f"cannot convert the answer schema to a grammar: {err}") from err
    return SPACE_RULE.sub('space ::= ""', gbnf).replace(STRING_CHAR, JSON_STRING_CHAR)


def nvidia_gpu_visible() -> str | None:
    """The GPU name, memory and free memory when an NVIDIA device answers `nvidia-smi`, else None."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def available_cores() -> int:
    """Cores this process may run on (affinity-aware): llama.cpp's worker threads spin, so one
    thread more than there are cores slows decoding down many times."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gpu_layers(options: EngineOptions) -> int:
    """Offload every layer when a GPU is usable; fail loudly when one is visible but unusable."""
    supports = supports_gpu_offload()
    visible = nvidia_gpu_visible()
    if options.gpu == "off":
        return 0
    if supports:
        log.info("GPU offload available%s: offloading all layers", f" ({visible})" if visible else "")
        return -1
    if visible and not options.allow_cpu:
        raise EngineError(
            f"an NVIDIA GPU is visible ({visible}) but this llama-cpp-python build has no GPU offload "
            "support (built without GGML_CUDA); rebuild it with CUDA or pass --allow-cpu to run on the CPU"
        )
    if options.gpu == "on" and not options.allow_cpu:
        raise EngineError("--gpu on was asked for, but llama.cpp reports no GPU offload support")
    log.info("no GPU offload: running on the CPU")
    return 0


def free_memory_bytes(on_gpu: bool) -> int | None:
    """Free GPU memory (from nvidia-smi) or available RAM; None when unknown."""
    if on_gpu:
        visible = nvidia_gpu_visible()
        if visible:
            try:
                return min(int(line.split(",")[2].split()[0]) for line in visible.splitlines()) << 20
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
        return min(requested, max_parallel_sequences() - 1)
    n = DEFAULT_N_SEQ_GPU if on_gpu else DEFAULT_N_SEQ_CPU
    if free:
        per_seq = max(n_ctx_seq * kv_per_token, 1)
        n = max(1, min(n, free // 2 // per_seq - 1))
    return n


def lcp(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if diff.size else n


def no_room(uid: str, prompt_tokens: int) -> Result:
    """The result for a prompt that leaves no room to answer in the context."""
    return Result(
        uid=uid, text="", prompt_tokens=prompt_tokens, finished=False, error="prompt does not fit the context"
    )


# -- tokenizer and chat template -------------------------------------------------------------------


class LlamaChat:
    """The model's tokenizer and chat template (a ChatTokenizer)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        metadata = model.metadata
        template = metadata.get("tokenizer.chat_template")
        if not template:
            log.warning("the model has no chat template; using ChatML")
            template = CHATML_TEMPLATE
        self._formatter = chat_formatter(template, bos=model.token_text(model.bos), eos=model.token_text(model.eos))
        arch = metadata.get("general.architecture", "")
        # A vocab-only load reports 0 as the trained context; the GGUF metadata has it.
        self._limit = model.n_ctx_train() or int(metadata.get(f"{arch}.context_length", 4096))
        self._warned = False

    @classmethod
    def open(cls, model_path: Path) -> LlamaChat:
        """Tokenizer and template only (no weights, no context): for counting before sizing the context."""
        return cls(Model(Path(model_path), vocab_only=True))

    @property
    def context_limit(self) -> int:
        return self._limit

    def render(self, messages: Sequence[Message]) -> str:
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._formatter(messages=msgs).prompt
        except Exception:  # noqa: BLE001 - templates without a system role raise here
            merged = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
            rest = [m for m in msgs if m["role"] != "system"]
            if rest and merged:
                rest[0] = {"role": rest[0]["role"], "content": merged + "\n\n" + rest[0]["content"]}
            return self._formatter(messages=rest).prompt

    def tokenize(self, text: str) -> list[int]:
        """Tokens of plain text: text that reads like a control token (`<|im_end|>`) stays text."""
        return self.model.tokenize(text, special=False)

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """The prompt's tokens: the chat template's own markers as control tokens, every message's
        content as text, so a report that contains `<|im_end|>` cannot end its turn.

        The template is rendered with a placeholder for each content and split on them; a template
        that trims contents is matched with trimmed contents. One that changes them otherwise cannot
        be split: its prompts are tokenised whole (control-token text in a report unprotected), with
        a warning."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        rendered = self.render([Message(m.role, mark) for m, mark in zip(messages, marks, strict=True)])
        pieces, rest = [], rendered
        for mark in marks:
            head, found, rest = rest.partition(mark)
            if not found or rendered.count(mark) != 1:
                return self._encode_whole(messages)
            pieces.append(head)
        full = self.render(messages)
        for shape in (str, str.strip):
            contents = [shape(m.content) for m in messages]
            if "".join(p + c for p, c in zip(pieces, contents, strict=True)) + rest == full:
                break
        else:
            return self._encode_whole(messages)
        tokens: list[int] = []
        for piece, content in zip(pieces, contents, strict=True):
            tokens += self.model.tokenize(piece, special=True)
            tokens += self.model.tokenize(content, special=False)
        return tokens + self.model.tokenize(rest, special=True)

    def _encode_whole(self, messages: Sequence[Message]) -> list[int]:
        if not self._warned:
            log.warning("the chat template changes message contents: reports are tokenised with the template")
            self._warned = True
        return self.model.tokenize(self.render(messages), special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.model.detokenize(tokens)


# -- the engine ---------------------------------------------------------------------------------------


class Grammars:
    """Compiled grammars, one per schema; each sequence decodes with a clone."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._scratch = GrammarScratch(model.n_vocab)
        self._compiled: dict[bytes, Grammar] = {}

    def compiled(self, schema: Mapping[str, Any]) -> Grammar:
        """The schema's grammar (built once; a bad schema is an EngineError)."""
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        grammar = self._compiled.get(key)
        if grammar is None:
            gbnf = schema_to_grammar(schema)
            grammar = Grammar.compile(self.model, gbnf, self._scratch)
            if grammar is None:
                raise EngineError(f"llama.cpp rejected the grammar built from the answer schema:\n{gbnf[:2000]}")
            self._compiled[key] = grammar
        return grammar

    def close(self) -> None:
        for grammar in self._compiled.values():
            grammar.free()
        self._compiled.clear()


@dataclass
class _Waiting:
    req: Request
    tokens: np.ndarray
    budget: int


_Entry = tuple[Decoder, Sequence[int], str, Phase]  # decoder, tokens to evaluate, rows, what they are


class Engine:
    """A llama.cpp model behind the Backend interface, N sequences decoded together."""

    name = "llama"

    def __init__(
        self,
        model_path: Path,
        options: EngineOptions,
        n_seq: int | None = None,
        *,
        exact: bool | None = None,
        forced_runs: bool = True,
    ):
        self.options = options
        self.closed = False
        n_threads = options.n_threads or available_cores()
        start = time.perf_counter()
        n_gpu = gpu_layers(options)
        self.model = Model(Path(model_path), n_gpu_layers=n_gpu)
        try:
            self._setup(options, n_seq, exact, n_gpu, n_threads, forced_runs)
        except BaseException:
            self.model.close()
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
        self, options: EngineOptions, n_seq: int | None, exact: bool | None, n_gpu: int, n_threads: int, forced: bool
    ) -> None:
        model = self.model
        self.chat = LlamaChat(model)
        self.on_gpu = n_gpu != 0
        self.exact = (not self.on_gpu) if exact is None else exact
        n_ctx_seq = -(-max(options.n_ctx, 256) // 256) * 256  # llama.cpp pads it to 256
        requested = n_seq if n_seq is not None else options.n_seq
        free = free_memory_bytes(self.on_gpu)
        self.n_seq = choose_n_seq(requested, self.on_gpu, n_ctx_seq, model.kv_bytes_per_token(), free)
        self.prefix_seq = self.n_seq  # the shared prefix lives in its own sequence, after the slots
        n_ctx_total = n_ctx_seq * (self.n_seq + 1)
        self.capacity = min(PREFILL_CHUNK + FEED_PER_SEQ * self.n_seq, n_ctx_total)
        self.prefill_chunk = min(PREFILL_CHUNK, self.capacity)
        self.ctx = Context(
            model,
            n_ctx=n_ctx_total,
            n_batch=self.capacity,
            n_ubatch=self.prefill_chunk,
            n_seq_max=self.n_seq + 1,
            n_threads=n_threads,
        )
        self.n_ctx_seq = self.ctx.n_ctx_seq
        self.n_ctx = self.n_ctx_seq  # what one request may use
        self.batch = Batch(self.capacity)
        self.stats = EngineStats()
        self.stats.extra.update(
            n_seq=self.n_seq, n_ctx_seq=self.n_ctx_seq, steps=0, calls=0, batch_tokens=0,
            topk_grammar_applies=0, stream_copies=0, answers=0, answer_steps=0, forced_runs=0, forced_tokens=0,
            forced_ends=0,
        )  # fmt: skip
        self.grammars = Grammars(model)
        # The tokens that ask the grammar which bytes may come next (None: forced runs off).
        self.probe = byte_probe(model, model.n_vocab, [model.eos]) if forced else None
        if forced and self.probe is None:
            log.warning("a byte has no token of its own in this vocabulary: forced runs are fed token by token")
        self._prefix: np.ndarray = np.zeros(0, dtype=np.intc)

    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab

    def check_schema(self, schema: Mapping[str, Any]) -> None:
        """Build the grammar for a schema now, so a bad schema fails at start-up."""
        self.grammars.compiled(schema)

    def figures(self) -> dict[str, Any]:
        """The engine's counters and timings, for the run summary."""
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self.stats).items()}

    # -- the Backend interface -------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> Iterator[Result]:
        if self.closed:
            raise RuntimeError("the engine is closed")
        waiting: deque[_Waiting] = deque()
        for req in requests:
            try:
                tokens = self.chat.encode(req.messages)
                budget = min(req.max_tokens, self.n_ctx_seq - len(tokens) - 1)
                if budget <= 0:
                    yield no_room(req.uid, len(tokens))
                    continue
                if req.schema:
                    self.grammars.compiled(req.schema)
            except (RuntimeError, ValueError) as err:
                log.warning("uid %s: generation failed: %s", req.uid, err)
                yield Result(uid=req.uid, text="", error=f"engine error: {err}")
                continue
            waiting.append(_Waiting(req, np.asarray(tokens, dtype=np.intc), budget))
        if not waiting:
            return
        p_len = self._share_prefix([w.tokens for w in waiting])
        slots: list[Decoder | None] = [None] * self.n_seq
        try:
            yield from self._run(waiting, slots, p_len)
        finally:
            for i, dec in enumerate(slots):
                if dec is not None:
                    dec.close()
                    slots[i] = None
            for seq in range(self.n_seq):
                self.ctx.forget(seq)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled final hidden states of texts, (n, n_embd) float32, for trained heads.

        A second context on the same weights, with embeddings on and llama.cpp's pooling off
        (`extractor.embeddings` says why: its mean pooling aborts in graph reservation when n_ubatch
        is not a multiple of n_seq_max), several whole texts per `llama_decode`, each cut to
        `embeddings.MAX_TOKENS` tokens. The context lives for this call only: callers pass many
        texts at once (the pipeline keeps the vectors in a cache, `embeddings.CachedEmbedder`)."""
        if self.closed:
            raise RuntimeError("the engine is closed")
        embedder = Embedder(self.model, n_threads=self.options.n_threads or available_cores(), on_gpu=self.on_gpu)
        try:
            return embedder(texts)
        finally:
            embedder.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.grammars.close()
        self.batch.close()
        self.ctx.close()
        self.model.close()

    # -- the shared prefix -----------------------------------------------------------------------

    def _share_prefix(self, arrays: list[np.ndarray]) -> int:
        """Evaluate the prefix the requests share in the prefix sequence; its length (0: none)."""
        first = arrays[0]
        # Every request keeps at least two prompt tokens of its own: a lone token would be
        # evaluated in a one-token physical batch (see the module docstring).
        shared = [min(lcp(first, a), len(a) - 2, len(first) - 2) for a in arrays[1:]]
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
        return p_len

    def _set_prefix(self, tokens: np.ndarray) -> None:
        """Make the prefix sequence hold exactly `tokens`, evaluating only what it lacks."""
        keep = lcp(self._prefix, tokens)
        if keep < len(self._prefix):
            self.ctx.forget(self.prefix_seq, keep)
        self._prefix = self._prefix[:keep]
        todo = tokens[keep:]
        t0 = time.perf_counter()
        starts = list(range(0, len(todo), self.prefill_chunk))
        if len(starts) > 1 and len(todo) - starts[-1] == 1:
            starts[-1] -= 1  # no one-token piece (see _chunk)
        for i, j in zip(starts, [*starts[1:], len(todo)][: len(starts)], strict=True):
            chunk = todo[i:j].tolist()
            n = self.batch.put(0, chunk, self.prefix_seq, keep + i, "last")
            try:
                self._decode(n)
            except RuntimeError:
                self.ctx.forget(self.prefix_seq)
                self._prefix = np.zeros(0, dtype=np.intc)
                raise
            self._prefix = tokens[: keep + i + len(chunk)]
        self.stats.prefill_s += time.perf_counter() - t0
        self.stats.prompt_tokens_evaluated += len(todo)

    # -- the step loop ---------------------------------------------------------------------------

    def _run(self, waiting: deque[_Waiting], slots: list[Decoder | None], p_len: int) -> Iterator[Result]:
        while waiting or any(d is not None for d in slots):
            done: list[Result] = []
            # Refill free sequences, lowest first; at the tail, keep the active ones contiguous.
            for seq in range(self.n_seq):
                if slots[seq] is not None:
                    continue
                if waiting:
                    w = waiting.popleft()
                    try:
                        slots[seq] = self._start(seq, w, p_len)
                    except (RuntimeError, ValueError) as err:
                        log.warning("uid %s: generation failed: %s", w.req.uid, err)
                        done.append(Result(uid=w.req.uid, text="", error=f"engine error: {err}"))
                else:
                    last = max((i for i, d in enumerate(slots) if d is not None), default=-1)
                    if last > seq:
                        self._move(last, seq)
                        slots[seq], slots[last] = slots[last], None
            active = [(seq, d) for seq, d in enumerate(slots) if d is not None]
            if not active:
                yield from done
                continue
            self.stats.extra["steps"] += 1
            seq_of = {id(d): seq for seq, d in active}
            decoders = [d for _, d in active]
            for entries in self._plan_exact(decoders) if self.exact else self._plan_mixed(decoders):
                try:
                    rows = self._evaluate(entries, seq_of)
                except RuntimeError as err:
                    log.warning("a batch of %d sequences failed: %s", len(entries), err)
                    for dec, *_ in entries:
                        seq = seq_of[id(dec)]
                        if slots[seq] is dec:
                            done.append(self._fail(slots, seq, err))
                    continue
                for dec, phase, i0, n in rows:
                    seq = seq_of[id(dec)]
                    try:
                        dec.evaluated(n, lambda j, i0=i0: self.ctx.logits(i0 + j))
                        if phase is Phase.SCORE:
                            self.ctx.forget(seq, dec.n_past)  # a candidate literal is evaluated, then forgotten
                    except (RuntimeError, ValueError) as err:
                        log.warning("uid %s: generation failed: %s", dec.req.uid, err)
                        done.append(self._fail(slots, seq, err))
                        continue
                    if dec.result is not None:
                        slots[seq] = None
                        dec.close()
                        done.append(dec.result)
            yield from done

    def _start(self, seq: int, w: _Waiting, p_len: int) -> Decoder:
        self.ctx.forget(seq)
        use_prefix = p_len > 0 and len(w.tokens) > p_len and lcp(self._prefix, w.tokens[:p_len]) == p_len
        if use_prefix:
            self.ctx.copy(self.prefix_seq, seq)
            self.stats.extra["stream_copies"] += 1
            self.stats.prompt_tokens_reused += p_len
        schema = w.req.schema
        return Decoder(
            w.req,
            w.tokens.tolist(),
            w.budget,
            self.grammars.compiled(schema).clone() if schema else None,  # no schema: free text
            self.model,
            self.stats,
            n_past=p_len if use_prefix else 0,
            n_ctx=self.n_ctx_seq,
            batch_room=self.capacity - self.n_seq,
            probe=self.probe,
        )

    def _move(self, src: int, dst: int) -> None:
        """Renumber a sequence (whole-stream copy), keeping active sequences contiguous."""
        self.ctx.copy(src, dst)
        self.ctx.forget(src)
        self.stats.extra["stream_copies"] += 1

    def _fail(self, slots: list[Decoder | None], seq: int, err: Exception) -> Result:
        dec = slots[seq]
        assert dec is not None
        slots[seq] = None
        dec.close()
        self.ctx.forget(seq)
        return dec.failed(err)

    # -- planning and evaluating one step ----------------------------------------------------------

    def _chunk(self, pending: int, budget: int) -> int:
        """Prompt tokens to evaluate now: all that fit, never leaving or taking a lone token
        (a one-token physical batch takes another kernel path and rounds differently)."""
        if pending <= budget:
            return pending
        take = budget - 1 if pending - budget == 1 else budget
        return take if take >= 2 else 0

    def _plan_exact(self, decoders: list[Decoder]) -> list[list[_Entry]]:
        """One call with every one-token feed (one token per sequence), then one call per longer
        feed (a prompt chunk, a forced literal, a multi-token candidate), so each sequence's tokens
        are evaluated in the same shapes whatever N is, and the logits come out the same on a CPU."""
        singles: list[_Entry] = []
        multis: list[_Entry] = []
        budget = self.prefill_chunk
        for dec in decoders:
            feed = dec.feed()
            if feed.phase is Phase.PROMPT:
                take = self._chunk(len(feed.tokens), budget)
                if take == 0:
                    continue
                budget -= take
                entry = _take(dec, feed, take)
            else:
                entry = _take(dec, feed, len(feed.tokens))
            (singles if len(entry[1]) == 1 else multis).append(entry)
        return ([singles] if singles else []) + [[m] for m in multis]

    def _plan_mixed(self, decoders: list[Decoder]) -> list[list[_Entry]]:
        """Everything in one call (fewest passes over the weights: the GPU plan). A forced run (a
        scored literal, scaffolding the grammar allows in one way) goes whole, or the part that fits;
        every prefilling sequence gets at least one token, so the run of sequence ids a physical
        batch takes is not broken."""
        feeds = {id(d): d.feed() for d in decoders}
        prompting = [d for d in decoders if feeds[id(d)].phase is Phase.PROMPT]
        room = self.capacity - len(prompting)
        entries: dict[int, _Entry] = {}
        for dec in decoders:
            feed = feeds[id(dec)]
            if feed.phase is Phase.PROMPT:
                continue
            n = min(len(feed.tokens), room) if feed.phase is Phase.DECODE else len(feed.tokens)
            if n == 0 or n > room:
                continue  # waits for the next step
            entry = _take(dec, feed, n)
            entries[id(dec)] = entry
            room -= len(entry[1])
        budget = max(0, min(room, self.prefill_chunk - len(prompting)))
        for dec in prompting:
            feed = feeds[id(dec)]
            take = 1 + min(len(feed.tokens) - 1, budget)
            budget -= take - 1
            entries[id(dec)] = _take(dec, feed, take)
        return [[entries[id(d)] for d in decoders if id(d) in entries]]

    def _evaluate(self, entries: list[_Entry], seq_of: dict[int, int]) -> list[tuple[Decoder, Phase, int, int]]:
        """Decode one call; its rows per sequence, and the time split by what the tokens were."""
        rows: list[tuple[Decoder, Phase, int, int]] = []
        at = 0
        n_phase = dict.fromkeys(Phase, 0)
        for dec, toks, which, phase in entries:
            rows.append((dec, phase, at, len(toks)))
            at = self.batch.put(at, toks, seq_of[id(dec)], dec.n_past, which)
            n_phase[phase] += len(toks)
        if at == 0:
            return rows
        t0 = time.perf_counter()
        self._decode(at)
        dt = time.perf_counter() - t0
        stats = self.stats
        stats.extra["calls"] += 1
        stats.extra["batch_tokens"] += at
        stats.prefill_s += dt * n_phase[Phase.PROMPT] / at
        stats.decode_s += dt * n_phase[Phase.DECODE] / at
        stats.scoring_s += dt * n_phase[Phase.SCORE] / at
        stats.prompt_tokens_evaluated += n_phase[Phase.PROMPT]
        return rows

    def _decode(self, n: int) -> None:
        check_stop()
        self.ctx.decode(self.batch, n)


def _take(dec: Decoder, feed: Feed, n: int) -> _Entry:
    """The first `n` tokens of a feed; a partial feed needs no logits."""
    rows = feed.rows if n == len(feed.tokens) else "none"
    return (dec, feed.tokens[:n], rows, feed.phase)
