"""The one module that calls llama.cpp (through llama-cpp-python's ctypes bindings).

Everything the engine needs from llama.cpp is here, as small classes over the C API: a model and
its vocabulary, a context with its KV memory, a batch, a grammar sampler, the chat template and
the schema-to-grammar converter. Only public bindings are used (`llama_cpp.llama_cpp` and the
`llama_chat_format` / `llama_grammar` helpers), so an upgrade of the pinned llama-cpp-python is
one file to check. llama.cpp's own log lines are kept (not printed) so that a load failure can
say what went wrong in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from llama_cpp import llama_cpp as C
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import json_schema_to_gbnf

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


class EngineError(RuntimeError):
    """The model or its grammar cannot be used; raised at start-up, never mid-job."""


# -- llama.cpp's log ------------------------------------------------------------------------------

_log_tail: deque[str] = deque(maxlen=40)
_LOG_WARN, _LOG_ERROR = 2, 3


@C.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", errors="replace").rstrip()
    if level in (_LOG_WARN, _LOG_ERROR) and line:
        _log_tail.append(line)
        log.debug("llama.cpp: %s", line)


C.llama_log_set(_log_callback, ctypes.c_void_p(0))  # quiet: lines are kept, not printed


def _last_complaint() -> str:
    """llama.cpp's last warning or error line (what a failed load logged), without its prefix."""
    for line in reversed(_log_tail):
        if "error" in line.lower() or "fail" in line.lower() or "invalid" in line.lower():
            return line.split(": ", 1)[-1] if ": " in line else line
    return _log_tail[-1] if _log_tail else ""


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """Silence what ggml's backends print straight to stdout/stderr (device lists at context creation)."""
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


# -- capabilities -----------------------------------------------------------------------------------


def supports_gpu_offload() -> bool:
    return bool(C.llama_supports_gpu_offload())


def max_parallel_sequences() -> int:
    return int(C.llama_max_parallel_sequences())


def schema_to_gbnf(schema_json: str) -> str:
    """llama-cpp-python's JSON-schema converter (raises bare Exceptions on what it cannot handle)."""
    return json_schema_to_gbnf(schema_json)


def chat_formatter(template: str, *, bos: str, eos: str) -> Any:
    """A Jinja2 chat-template renderer: `formatter(messages=[{role, content}]).prompt`."""
    return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)


# -- model ------------------------------------------------------------------------------------------


def check_gguf(path: Path) -> None:
    """One-line errors for the common bad files, before llama.cpp sees them."""
    if not path.is_file():
        raise EngineError(f"{path}: no such model file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise EngineError(f"{path}: not a GGUF model file (it starts with {head!r}, a GGUF file with b'GGUF')")


class Model:
    """A loaded GGUF model and its vocabulary (`vocab_only`: tokenizer and metadata, no weights)."""

    def __init__(self, path: Path, *, n_gpu_layers: int = 0, vocab_only: bool = False) -> None:
        path = Path(path)
        check_gguf(path)
        params = C.llama_model_default_params()
        params.vocab_only = vocab_only
        if not vocab_only:
            params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers
            params.load_mode = C.LLAMA_LOAD_MODE_MMAP
        _log_tail.clear()
        ptr = C.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not ptr:
            why = _last_complaint() or "llama.cpp gave no reason"
            size = path.stat().st_size
            raise EngineError(
                f"{path}: llama.cpp cannot load this GGUF file ({size} bytes; truncated or corrupt?): {why}"
            )
        self.path = path
        self.ptr = ptr
        self.vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self.metadata = self._read_metadata()
        self._pieces: dict[int, bytes] = {}
        self._text_tokens: dict[str, list[int]] = {}
        self._buf = ctypes.create_string_buffer(256)

    def _read_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        size = 1024
        buf = ctypes.create_string_buffer(size)
        for i in range(C.llama_model_meta_count(self.ptr)):
            strings = []
            for reader in (C.llama_model_meta_key_by_index, C.llama_model_meta_val_str_by_index):
                n = reader(self.ptr, i, buf, size)
                if n >= size:
                    size = n + 1
                    buf = ctypes.create_string_buffer(size)
                    reader(self.ptr, i, buf, size)
                strings.append(buf.value.decode("utf-8", errors="replace"))
            out[strings[0]] = strings[1]
        return out

    # -- vocabulary --

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids of `text` (no BOS); `special`: control-token text becomes control tokens."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        tokens = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.vocab, data, len(data), tokens, n_max, False, special)
        if n < 0:
            n_max = -n
            tokens = (C.llama_token * n_max)()
            n = C.llama_tokenize(self.vocab, data, len(data), tokens, n_max, False, special)
            if n < 0:
                raise RuntimeError(f"llama.cpp could not tokenize a text of {len(data)} bytes")
        return list(tokens[:n])

    def text_tokens(self, text: str) -> list[int]:
        """`tokenize(text, special=False)`, cached (the literals scored at every decision point)."""
        toks = self._text_tokens.get(text)
        if toks is None:
            toks = self._text_tokens[text] = self.tokenize(text, special=False)
        return toks

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens: none)."""
        piece = self._pieces.get(token)
        if piece is None:
            n = C.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0, False)
            piece = self._pieces[token] = bytes(self._buf[: max(n, 0)])
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        out = b"".join(self.piece(t) for t in tokens)
        if tokens and tokens[0] == self.bos and out[:1] == b" ":
            out = out[1:]
        return out.decode("utf-8", errors="ignore")

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    @property
    def bos(self) -> int:
        return int(C.llama_vocab_bos(self.vocab))

    @property
    def add_bos(self) -> bool:
        """Whether the model's tokenizer starts a text with BOS."""
        return bool(C.llama_vocab_get_add_bos(self.vocab))

    @property
    def eos(self) -> int:
        return int(C.llama_vocab_eos(self.vocab))

    def token_text(self, token: int) -> str:
        return C.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace") if token >= 0 else ""

    # -- architecture --

    def n_ctx_train(self) -> int:
        return int(C.llama_model_n_ctx_train(self.ptr))

    def kv_bytes_per_token(self) -> int:
        """F16 K and V cache bytes one token takes in every layer."""
        n_layer = C.llama_model_n_layer(self.ptr)
        n_head = max(C.llama_model_n_head(self.ptr), 1)
        n_head_kv = C.llama_model_n_head_kv(self.ptr) or n_head
        arch = self.metadata.get("general.architecture", "")
        n_embd = C.llama_model_n_embd(self.ptr)
        k_len = int(self.metadata.get(f"{arch}.attention.key_length", n_embd // n_head))
        v_len = int(self.metadata.get(f"{arch}.attention.value_length", k_len))
        return n_layer * n_head_kv * (k_len + v_len) * 2

    def n_embd(self) -> int:
        return int(C.llama_model_n_embd(self.ptr))

    def close(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None


# -- context, memory and batch ----------------------------------------------------------------------


class Context:
    """An inference context over a model: `n_seq_max` sequences with a KV cache of their own each."""

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int,
        n_batch: int,
        n_ubatch: int,
        n_seq_max: int,
        n_threads: int,
        embeddings: bool = False,
        kv_unified: bool = False,
    ) -> None:
        """`embeddings`: every token's final hidden state is kept (`token_embeddings`), unpooled;
        see `extractor.embeddings` for why llama.cpp's own pooling is not used."""
        cparams = C.llama_context_default_params()
        # What llama_cpp.Llama sets (the C defaults differ: flash attention auto, 4 threads, YaRN -1),
        # because those defaults change the logits.
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.rope_scaling_type = C.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED
        cparams.pooling_type = C.LLAMA_POOLING_TYPE_NONE if embeddings else C.LLAMA_POOLING_TYPE_UNSPECIFIED
        cparams.attention_type = C.LLAMA_ATTENTION_TYPE_UNSPECIFIED
        cparams.rope_freq_base = 0
        cparams.rope_freq_scale = 0
        cparams.yarn_ext_factor = -1.0
        cparams.yarn_attn_factor = 1.0
        cparams.yarn_beta_fast = 32.0
        cparams.yarn_beta_slow = 1.0
        cparams.yarn_orig_ctx = 0
        cparams.embeddings = embeddings
        cparams.offload_kqv = True
        cparams.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.no_perf = False
        cparams.kv_unified = kv_unified  # False: each sequence has cells of its own
        _log_tail.clear()
        with _quiet_fds():
            ptr = C.llama_init_from_model(model.ptr, cparams)
        if not ptr:
            raise EngineError(
                f"cannot create a context of {n_ctx} tokens for {model.path}: {_last_complaint() or 'no reason given'}"
            )
        self.ptr = ptr
        self.model = model
        self.mem = C.llama_get_memory(ptr)
        self.n_ctx_seq = int(C.llama_n_ctx_seq(ptr))

    def decode(self, batch: Batch, n_tokens: int) -> None:
        batch.raw.n_tokens = n_tokens
        rc = C.llama_decode(self.ptr, batch.raw)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, row: int) -> np.ndarray:
        """The logits of batch row `row` of the last decode (a view, valid until the next one)."""
        ptr = C.llama_get_logits_ith(self.ptr, row)
        if not ptr:
            raise RuntimeError(f"no logits for batch row {row}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def token_embeddings(self, n_rows: int) -> np.ndarray:
        """The final hidden state of each of the last decode's `n_rows` batch rows, in batch order
        (embedding contexts only: every row is an output there), as an (n_rows, n_embd) copy."""
        ptr = C.llama_get_embeddings(self.ptr)
        if not ptr:
            raise RuntimeError("no token embeddings (not an embedding context?)")
        dim = int(C.llama_model_n_embd_out(self.model.ptr)) or self.model.n_embd()
        return np.ctypeslib.as_array(ptr, shape=(n_rows, dim)).copy()

    def clear(self) -> None:
        """Drop every sequence's cells."""
        C.llama_memory_clear(self.mem, True)

    def forget(self, seq: int, start: int = -1) -> None:
        """Drop a sequence's cells from position `start` on (-1: all of them)."""
        C.llama_memory_seq_rm(self.mem, seq, start, -1)

    def copy(self, src: int, dst: int) -> None:
        """Give sequence `dst` every cell of sequence `src`."""
        C.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def close(self) -> None:
        if self.ptr:
            C.llama_free(self.ptr)
            self.ptr = None


class Batch:
    """A `llama_batch` with numpy views on its arrays; each token belongs to one sequence."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = C.llama_batch_init(capacity, 0, 1)
        self._token = np.ctypeslib.as_array(self.raw.token, shape=(capacity,))
        self._pos = np.ctypeslib.as_array(self.raw.pos, shape=(capacity,))
        self._logits = np.ctypeslib.as_array(self.raw.logits, shape=(capacity,))
        np.ctypeslib.as_array(self.raw.n_seq_id, shape=(capacity,))[:] = 1

    def put(self, at: int, tokens: Sequence[int], seq: int, pos: int, rows: str) -> int:
        """Write one sequence's tokens from row `at`; `rows` says which need logits (all, last,
        none). Returns the next free row."""
        n = len(tokens)
        self._token[at : at + n] = tokens
        self._pos[at : at + n] = np.arange(pos, pos + n, dtype=np.int32)
        self._logits[at : at + n] = 1 if rows == "all" else 0
        if rows == "last":
            self._logits[at + n - 1] = 1
        seq_ids = self.raw.seq_id
        for i in range(at, at + n):
            seq_ids[i][0] = seq
        return at + n

    def close(self) -> None:
        if self.raw is not None:
            C.llama_batch_free(self.raw)
            self.raw = None


# -- grammar -----------------------------------------------------------------------------------------


class GrammarScratch:
    """Token-data buffers the grammar checks write into (one set per model: checks never overlap)."""

    def __init__(self, n_vocab: int) -> None:
        self.one = (C.llama_token_data * 1)()
        self.one_arr = C.llama_token_data_array(data=self.one, size=1, selected=-1, sorted=False)
        dtype = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        self.full = np.zeros(n_vocab, dtype=dtype)
        self.full_arr = C.llama_token_data_array(
            data=self.full.ctypes.data_as(C.llama_token_data_p), size=n_vocab, selected=-1, sorted=False
        )


class Grammar:
    """One llama.cpp grammar sampler: its parse state, what it allows next, accepting tokens."""

    def __init__(self, ptr: Any, scratch: GrammarScratch) -> None:
        self.ptr = ptr
        self._scratch = scratch

    @classmethod
    def compile(cls, model: Model, gbnf: str, scratch: GrammarScratch) -> Grammar | None:
        ptr = C.llama_sampler_init_grammar(model.vocab, gbnf.encode("utf-8"), b"root")
        return cls(ptr, scratch) if ptr else None

    def clone(self) -> Grammar:
        ptr = C.llama_sampler_clone(self.ptr)
        if not ptr:
            raise EngineError("llama.cpp could not clone a grammar sampler")
        return Grammar(ptr, self._scratch)

    def reset(self) -> None:
        C.llama_sampler_reset(self.ptr)

    def accept(self, token: int) -> None:
        C.llama_sampler_accept(self.ptr, token)

    def allowed(self, token: int) -> bool:
        s = self._scratch
        s.one[0].id = token
        s.one[0].logit = 0.0
        s.one[0].p = 0.0
        s.one_arr.size = 1
        s.one_arr.selected = -1
        C.llama_sampler_apply(self.ptr, ctypes.byref(s.one_arr))
        return math.isfinite(s.one[0].logit)

    def best_allowed(self, ids: np.ndarray, logits: np.ndarray) -> int | None:
        """The highest-logit token of `ids` (ascending) the grammar allows (lowest id on ties), else None."""
        s = self._scratch
        n = len(ids)
        view = s.full[:n]
        view["id"] = ids
        view["logit"] = logits
        view["p"] = 0.0
        s.full_arr.size = n
        s.full_arr.selected = -1
        s.full_arr.sorted = False
        C.llama_sampler_apply(self.ptr, ctypes.byref(s.full_arr))
        kept = s.full["logit"][: s.full_arr.size]
        best = int(np.argmax(kept))
        if not math.isfinite(float(kept[best])):
            return None
        return int(s.full["id"][best])

    def free(self) -> None:
        if self.ptr:
            C.llama_sampler_free(self.ptr)
            self.ptr = None
