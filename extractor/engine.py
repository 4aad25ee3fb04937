"""The llama.cpp backend: model loading, grammar-constrained greedy decoding, label likelihoods.

Decoding is greedy under a JSON grammar built from the answer schema. The grammar is checked
against the greedy token first, then the top tokens, and applied to the whole vocabulary only
when none of those is allowed (`GrammarSampler`, shared with the batched engine). Where a
scored field's value starts, the engine reads the log-likelihood of every allowed literal
(multi-token literals as summed log-probabilities) and writes the most likely one, so the answer
and its scores agree.
The longest common token prefix with the previous prompt stays in the KV cache, so the fixed
instructions are evaluated once per job.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from llama_cpp import Llama, llama_cpp
from llama_cpp._internals import LlamaModel
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import json_schema_to_gbnf

from extractor.backend import Message, Request, Result, check_stop

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class EngineError(RuntimeError):
    """The model or its grammar cannot be used; raised at start-up, never mid-job."""


def schema_to_grammar(schema: Mapping[str, Any]) -> str:
    """GBNF for a JSON schema; a schema the converter cannot handle is an error, not a fallback."""
    try:
        return json_schema_to_gbnf(orjson.dumps(schema).decode())
    except Exception as err:  # noqa: BLE001 - the converter raises bare Exceptions
        raise EngineError(f"cannot convert the answer schema to a grammar: {err}") from err


def nvidia_gpu_visible() -> str | None:
    """The GPU name when an NVIDIA device answers `nvidia-smi`, else None."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,memory.free",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@dataclass
class EngineStats:
    """Where the time went, for the run summary and the benchmark."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    sampling_s: float = 0.0
    scoring_s: float = 0.0
    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    output_tokens: int = 0
    full_grammar_applies: int = 0
    greedy_accepted: int = 0
    missed_decision_points: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def available_cores() -> int:
    """Cores this process may run on (affinity-aware): llama.cpp's worker threads spin, so one
    thread more than there are cores slows decoding down many times."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


TOP_K_TIERS = (64, 2048)  # tokens checked against the grammar when the greedy one is rejected


class GrammarSampler:
    """Greedy choice under a JSON-schema grammar, as both engines make it.

    Applying a grammar to the whole vocabulary costs about as much as a decode step, so the greedy
    token is checked alone first, then the top 64 and the top 2,048 tokens, and the vocabulary only
    when none of those is allowed: the chosen token is always the one a full scan would choose.
    Compiled grammars are kept per schema; token pieces are cached.
    """

    def __init__(self, vocab: Any, n_vocab: int, stats: EngineStats) -> None:
        self.vocab, self.n_vocab, self.stats = vocab, n_vocab, stats
        self._grammars: dict[bytes, Any] = {}
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_arr = llama_cpp.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        dtype = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        self._full = np.zeros(n_vocab, dtype=dtype)
        self._full_arr = llama_cpp.llama_token_data_array(
            data=self._full.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab, selected=-1, sorted=False
        )
        self._ids = np.arange(n_vocab, dtype=np.intc)

    def compiled(self, schema: Mapping[str, Any]) -> Any:
        """The schema's grammar sampler (built once; a bad schema is an EngineError)."""
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        sampler = self._grammars.get(key)
        if sampler is None:
            gbnf = schema_to_grammar(schema)
            sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
            if not sampler:
                raise EngineError(f"llama.cpp rejected the grammar built from the answer schema:\n{gbnf[:2000]}")
            self._grammars[key] = sampler
        return sampler

    def allowed(self, grammar: Any, token: int) -> bool:
        self._one[0].id = token
        self._one[0].logit = 0.0
        self._one[0].p = 0.0
        self._one_arr.size = 1
        self._one_arr.selected = -1
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(self._one_arr))
        return math.isfinite(self._one[0].logit)

    def _best_allowed(self, grammar: Any, ids: np.ndarray, logits: np.ndarray) -> int | None:
        """The highest-logit token of `ids` (ascending) the grammar allows (lowest id on ties), else None."""
        n = len(ids)
        view = self._full[:n]
        view["id"] = ids
        view["logit"] = logits
        view["p"] = 0.0
        self._full_arr.size = n
        self._full_arr.selected = -1
        self._full_arr.sorted = False
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(self._full_arr))
        kept = self._full["logit"][: self._full_arr.size]
        best = int(np.argmax(kept))
        if not math.isfinite(float(kept[best])):
            return None
        return int(self._full["id"][best])

    def pick(self, grammar: Any, logits: np.ndarray) -> int:
        """The greedy token the grammar allows."""
        t0 = time.perf_counter()
        token = int(np.argmax(logits))
        if self.allowed(grammar, token):
            self.stats.greedy_accepted += 1
        else:
            choice = None
            for k in TOP_K_TIERS:
                top = np.argpartition(logits, -k)[-k:]
                ids = np.nonzero(logits >= logits[top].min())[0].astype(np.intc)  # ascending, ties included
                choice = self._best_allowed(grammar, ids, logits[ids])
                self.stats.extra["topk_grammar_applies"] = self.stats.extra.get("topk_grammar_applies", 0) + 1
                if choice is not None:
                    break
            if choice is None:
                self.stats.full_grammar_applies += 1
                choice = self._best_allowed(grammar, self._ids, logits)
                if choice is None:
                    raise RuntimeError("the grammar allows no token")
            token = choice
        self.stats.sampling_s += time.perf_counter() - t0
        return token

    def piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
            piece = bytes(self._piece_buf[: max(n, 0)])
            self._pieces[token] = piece
        return piece

    def close(self) -> None:
        for sampler in self._grammars.values():
            llama_cpp.llama_sampler_free(sampler)
        self._grammars.clear()


class LlamaChat:
    """The model's tokenizer and chat template, without allocating a context for inference."""

    def __init__(self, llm: Llama | LlamaModel) -> None:
        self.model = llm._model if isinstance(llm, Llama) else llm
        model = self.model
        metadata = model.metadata()
        template = metadata.get("tokenizer.chat_template")
        if not template:
            log.warning("the model has no chat template; using ChatML")
            template = CHATML_TEMPLATE
        bos = model.token_get_text(model.token_bos()) if model.token_bos() >= 0 else ""
        eos = model.token_get_text(model.token_eos()) if model.token_eos() >= 0 else ""
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        arch = metadata.get("general.architecture", "")
        # A vocab-only load reports 0 as the trained context; the GGUF metadata has it.
        self._limit = model.n_ctx_train() or int(metadata.get(f"{arch}.context_length", 4096))

    @classmethod
    def open(cls, model_path: Path) -> LlamaChat:
        """Tokenizer and template only (no weights, no context): for counting before sizing the context."""
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        return cls(LlamaModel(path_model=str(model_path), params=params, verbose=False))

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
                rest[0] = {
                    "role": rest[0]["role"],
                    "content": merged + "\n\n" + rest[0]["content"],
                }
            return self._formatter(messages=rest).prompt

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.model.detokenize(list(tokens)).decode("utf-8", errors="ignore")


@dataclass(frozen=True)
class EngineOptions:
    n_ctx: int = 4096
    n_threads: int = 0  # 0: all cores
    n_batch: int = 512
    gpu: str = "auto"  # "auto" | "on" | "off"
    allow_cpu: bool = False
    seed: int = 0
    n_seq: int = 0  # sequences decoded together by BatchedLlamaEngine (0: automatic); LlamaEngine ignores it


def gpu_layers(options: EngineOptions) -> int:
    """Offload every layer when a GPU is usable; fail loudly when one is visible but unusable."""
    supports = bool(llama_cpp.llama_supports_gpu_offload())
    visible = nvidia_gpu_visible()
    if options.gpu == "off":
        return 0
    if supports:
        log.info(
            "GPU offload available%s: offloading all layers",
            f" ({visible})" if visible else "",
        )
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


class LlamaEngine:
    """A llama.cpp model behind the Backend interface, one sequence at a time."""

    name = "llama"

    def __init__(self, model_path: Path, options: EngineOptions) -> None:
        self.options = options
        n_threads = options.n_threads or available_cores()
        start = time.perf_counter()
        try:
            self.llm = Llama(
                str(model_path),
                n_ctx=options.n_ctx,
                n_batch=min(options.n_batch, options.n_ctx),
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=gpu_layers(options),
                seed=options.seed,
                logits_all=False,
                verbose=False,
            )
        except ValueError as err:
            raise EngineError(f"cannot load {model_path} with a {options.n_ctx}-token context: {err}") from err
        self.chat = LlamaChat(self.llm)
        self.n_ctx = options.n_ctx
        self.closed = False
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = self.llm.n_vocab()
        self.stats = EngineStats()
        self.sampler = GrammarSampler(self.vocab, self.n_vocab, self.stats)
        log.info(
            "loaded %s in %.1fs (context %d, %d threads)",
            Path(model_path).name,
            time.perf_counter() - start,
            options.n_ctx,
            n_threads,
        )

    # -- grammar -------------------------------------------------------------------------------

    def check_schema(self, schema: Mapping[str, Any]) -> None:
        """Build the grammar sampler for a schema now, so a bad schema fails at start-up."""
        self._grammar(schema)

    def _grammar(self, schema: Mapping[str, Any]) -> Any:
        sampler = self.sampler.compiled(schema)
        llama_cpp.llama_sampler_reset(sampler)
        return sampler

    # -- model evaluation ----------------------------------------------------------------------

    def _logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _prefill(self, tokens: list[int]) -> None:
        """Evaluate the prompt, keeping the longest prefix shared with what the cache holds."""
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens]
        n = min(len(cached), len(tokens) - 1)
        keep = 0
        if n > 0:
            diff = np.nonzero(cached[:n] != np.asarray(tokens[:n]))[0]
            keep = int(diff[0]) if diff.size else n
        t0 = time.perf_counter()
        llm.n_tokens = keep
        llm.eval(tokens[keep:])
        self.stats.prefill_s += time.perf_counter() - t0
        self.stats.prompt_tokens_reused += keep
        self.stats.prompt_tokens_evaluated += len(tokens) - keep

    def _step(self, tokens: list[int]) -> np.ndarray:
        check_stop()
        t0 = time.perf_counter()
        self.llm.eval(tokens)
        self.stats.decode_s += time.perf_counter() - t0
        return self._logits()

    def _continuation_logprob(self, logits: np.ndarray, tokens: list[int]) -> float:
        """Summed log-probability of `tokens` following the current position (cache left as found)."""
        logp = float(_log_softmax(logits)[tokens[0]])
        if len(tokens) == 1:
            return logp
        llm = self.llm
        n0 = llm.n_tokens
        batch = llm._batch
        batch.set_batch(tokens[:-1], n_past=n0, logits_all=True)
        llm._ctx.decode(batch)
        for i, nxt in enumerate(tokens[1:]):
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, i)
            row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            logp += float(_log_softmax(row)[nxt])
        llm._ctx.kv_cache_seq_rm(-1, n0, -1)
        return logp

    # -- the Backend interface -----------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> Iterator[Result]:
        for req in requests:
            try:
                yield self._generate_one(req)
            except (RuntimeError, ValueError) as err:
                log.warning("uid %s: generation failed: %s", req.uid, err)
                self.llm.n_tokens = 0
                yield Result(uid=req.uid, text="", error=f"engine error: {err}")

    def _generate_one(self, req: Request) -> Result:
        tokens = self.chat.tokenize(req.prompt)
        budget = min(req.max_tokens, self.llm.n_ctx() - len(tokens) - 1)
        if budget <= 0:
            return no_room(req.uid, len(tokens))
        grammar = self._grammar(req.schema) if req.schema else None  # no schema: free text
        self._prefill(tokens)
        logits = self._logits()
        fields = list(req.schema.get("properties", {}))
        scored = [(name, req.choices[name]) for name in fields if name in req.choices]
        terminators = {name: ("," if i < len(fields) - 1 else "}") for i, name in enumerate(fields)}
        likelihoods: dict[str, dict[str, float]] = {}
        out: list[int] = []
        text = b""
        finished = False
        while len(out) < budget:
            if scored and _at_value(text, scored[0][0]):
                name, literals = scored.pop(0)
                forced = self._score_field(
                    grammar,
                    logits,
                    text,
                    literals,
                    terminators[name],
                    likelihoods.setdefault(name, {}),
                )
                if forced:
                    forced = forced[: budget - len(out)]
                    for tok in forced:
                        llama_cpp.llama_sampler_accept(grammar, tok)
                        text += self.sampler.piece(tok)
                    out += forced
                    logits = self._step(forced)
                    continue
            token = self.sampler.pick(grammar, logits) if grammar is not None else int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                finished = True
                break
            if grammar is not None:
                llama_cpp.llama_sampler_accept(grammar, token)
            out.append(token)
            text += self.sampler.piece(token)
            logits = self._step([token])
        self.stats.output_tokens += len(out)
        self.stats.missed_decision_points += len(scored)
        return Result(
            uid=req.uid,
            text=text.decode("utf-8", errors="replace"),
            likelihoods=likelihoods,
            prompt_tokens=len(tokens),
            output_tokens=len(out),
            finished=finished,
        )

    def _score_field(
        self,
        grammar: Any,
        logits: np.ndarray,
        text: bytes,
        literals: Sequence[str],
        terminator: str,
        into: dict[str, float],
    ) -> list[int]:
        """Score every literal (with and without the optional space) and return the best one's tokens."""
        t0 = time.perf_counter()
        prefixes = ("", " ") if text.endswith(b":") else ("",)
        best: tuple[float, list[int]] | None = None
        for literal in literals:
            variants = []
            for prefix in prefixes:
                toks = self.llm.tokenize(
                    (prefix + literal + terminator).encode("utf-8"),
                    add_bos=False,
                    special=False,
                )
                lp = self._continuation_logprob(logits, toks)
                variants.append(lp)
                if best is None or lp > best[0]:
                    best = (lp, toks)
            into[literal] = float(np.logaddexp.reduce(variants))
        self.stats.scoring_s += time.perf_counter() - t0
        if best is None:
            return []
        forced = best[1]
        # Only force what the grammar accepts; a surprise here falls back to free decoding.
        probe = self._grammar_copy(grammar)
        try:
            for tok in forced:
                if not self.sampler.allowed(probe, tok):
                    return []
                llama_cpp.llama_sampler_accept(probe, tok)
        finally:
            llama_cpp.llama_sampler_free(probe)
        return forced

    def _grammar_copy(self, grammar: Any) -> Any:
        return llama_cpp.llama_sampler_clone(grammar)

    def close(self) -> None:
        self.sampler.close()
        self.llm.close()
        self.closed = True


def no_room(uid: str, prompt_tokens: int) -> Result:
    """The result for a prompt that leaves no room to answer in the context."""
    return Result(
        uid=uid, text="", prompt_tokens=prompt_tokens, finished=False, error="prompt does not fit the context"
    )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    m = float(np.max(logits))
    return logits - (m + math.log(float(np.sum(np.exp(logits - m)))))


def _at_value(text: bytes, name: str) -> bool:
    """True where the generated JSON has just written the key of field `name` and its colon."""
    key = orjson.dumps(name) + b":"
    return text.endswith(key) or text.endswith(key + b" ")
