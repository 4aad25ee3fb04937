"""One sequence's decoding, without the model: what to feed next, and what to do with the logits.

The engine's scheduler packs the feeds of several decoders into one batch and hands each its
logits back; everything a sequence decides lives here, in plain Python and numpy, so that it is
tested with scripted logits (test/test_decoder.py):

* Greedy decoding under a JSON grammar: the greedy token is checked alone first, then the top 64
  and the top 2,048 tokens, and the whole vocabulary only when none of those is allowed, so the
  chosen token is always the one a full scan would choose.
* Field scoring: where a scored field's value starts (its key and colon just written), the
  log-likelihood of every allowed literal is read, in each spelling the grammar allows (with and
  without a space after the colon, where it allows one; the engine's compact grammar does not), the
  literal's terminator included (multi-token literals: the first token from the current logits,
  the others from evaluating the literal, which is then forgotten). The most likely literal is
  forced (grammar permitting), so the answer and its scores agree.
* Forced runs: after each written token, the text the grammar allows in exactly one way (the rest
  of a key, the opening brace, the end) is worked out byte by byte (`forced_run`, with the one-
  token-per-byte `Probe`) and fed with that token as one multi-token feed, so the steps left are
  the ones where the model chooses. A run never passes a scored field's value start, and its last
  token is left to the model (it merges with what follows, such as '":'). `steps` counts a
  sequence's evaluations after its prompt.
* The token budget, end-of-generation, and the Result.

The grammar and the vocabulary sit behind the small protocols below (llama.cpp's in
extractor/llama_api.py).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

from extractor.backend import Request, Result

TOP_K_TIERS = (64, 2048)  # tokens checked against the grammar when the greedy one is rejected
MAX_FORCED_BYTES = 256  # the longest forced run worked out at once (the rest follows in the next step)
QUICK_BYTES = b' e"0t,a1:}'  # bytes often allowed where the model chooses (see Probe)


class Grammar(Protocol):
    """A grammar's parse state (one per sequence)."""

    def allowed(self, token: int) -> bool: ...

    def best_allowed(self, ids: np.ndarray, logits: np.ndarray) -> int | None: ...

    def accept(self, token: int) -> None: ...

    def clone(self) -> Grammar: ...

    def free(self) -> None: ...


class Vocab(Protocol):
    """What decoding needs from a tokenizer."""

    def text_tokens(self, text: str) -> list[int]: ...

    def piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...


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


class Phase(enum.Enum):
    PROMPT = 0  # prompt tokens still to evaluate
    DECODE = 1  # a generated token, or a forced literal, to evaluate
    SCORE = 2  # a candidate literal to evaluate (and forget) for its likelihood
    DONE = 3


@dataclass(frozen=True)
class Feed:
    """What a sequence wants evaluated next; `rows` says whose logits it needs: "last" (of the
    whole feed), "all" or "none". The scheduler may take a first part of a PROMPT or DECODE feed."""

    phase: Phase
    tokens: Sequence[int]
    rows: str


@dataclass
class _Variant:
    literal: str
    tokens: list[int]
    logp: float


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = float(np.max(logits))
    return logits - (m + math.log(float(np.sum(np.exp(logits - m)))))


def at_value(text: bytes, name: str) -> bool:
    """True where the generated JSON has just written the key of field `name` and its colon (the
    grammar allows a space before and after the colon)."""
    key = orjson.dumps(name)
    return any(text.endswith(key + sep) for sep in (b":", b": ", b" :", b" : "))


def greedy_allowed(grammar: Grammar, logits: np.ndarray, stats: EngineStats) -> int:
    """The greedy token the grammar allows (see the module docstring for the tiers)."""
    t0 = time.perf_counter()
    token = int(np.argmax(logits))
    if grammar.allowed(token):
        stats.greedy_accepted += 1
    else:
        choice = None
        for k in TOP_K_TIERS:
            if k >= len(logits):
                break
            top = np.argpartition(logits, -k)[-k:]
            ids = np.nonzero(logits >= logits[top].min())[0].astype(np.intc)  # ascending, ties included
            choice = grammar.best_allowed(ids, logits[ids])
            stats.extra["topk_grammar_applies"] = stats.extra.get("topk_grammar_applies", 0) + 1
            if choice is not None:
                break
        if choice is None:
            stats.full_grammar_applies += 1
            choice = grammar.best_allowed(np.arange(len(logits), dtype=np.intc), logits)
            if choice is None:
                raise RuntimeError("the grammar allows no token")
        token = choice
    stats.sampling_s += time.perf_counter() - t0
    return token


@dataclass(frozen=True)
class Probe:
    """The tokens whose grammar check says which bytes may come next (`byte_probe`): one per byte
    (ascending, the end of generation included), and a few common ones checked one by one first,
    since where the model chooses (inside a string, a number) two of those are usually allowed."""

    ids: np.ndarray
    quick: tuple[int, ...]


def byte_probe(vocab: Vocab, n_vocab: int, eog: Sequence[int]) -> Probe | None:
    """One token per byte that starts a token (the first whose piece is that byte alone) and the
    end-of-generation tokens. None when a byte starts tokens but has no token of its own: the probe
    could not ask about it and might think it excluded. (A byte that starts no token, such as 0xFF
    in UTF-8 vocabularies, can never be written next, so it needs no probe.)"""
    single: dict[int, int] = {}
    starts: set[int] = set()
    for token in range(n_vocab):
        piece = vocab.piece(token)
        if not piece:
            continue
        starts.add(piece[0])
        if len(piece) == 1 and piece[0] not in single:
            single[piece[0]] = token
    if starts - single.keys():
        return None
    ids = np.unique(np.array([*single.values(), *eog], dtype=np.intc))
    return Probe(ids, tuple(single[b] for b in QUICK_BYTES if b in single))


def only_allowed(grammar: Grammar, probe: Probe) -> int | None:
    """The one token of the probe the grammar allows, or None when it allows none or several: the
    quick tokens one by one (two allowed: None), then one check of all the others."""
    seen = None
    for token in probe.quick:
        if grammar.allowed(token):
            if seen is not None:
                return None
            seen = token
    ids = probe.ids if seen is None else probe.ids[probe.ids != seen]
    other = grammar.best_allowed(ids, np.zeros(len(ids), dtype=np.float32))
    if seen is None:
        if other is None:
            return None
        rest = ids[ids != other]
        return other if grammar.best_allowed(rest, np.zeros(len(rest), dtype=np.float32)) is None else None
    return seen if other is None else None


def forced_run(
    grammar: Grammar, probe: Probe, vocab: Vocab, stop: Callable[[bytes], bool], limit: int = MAX_FORCED_BYTES
) -> tuple[bytes, bool]:
    """The text the grammar allows in exactly one way from here (byte by byte, with `probe` from
    `byte_probe`), and whether the end of generation is then the only thing left. The run ends
    where the grammar leaves a choice, after `limit` bytes, or where `stop(run)` says (a scored
    field's value starts there); it is cut to whole UTF-8 characters. Checked on a copy."""
    token = only_allowed(grammar, probe) if limit > 0 else None
    if token is None:
        return b"", False  # the common case (the model chooses): no copy made
    if vocab.is_eog(token):
        return b"", True
    state = grammar.clone()
    run = b""
    ends = False
    try:
        while True:
            state.accept(token)
            run += vocab.piece(token)
            if stop(run) or len(run) >= limit:
                break
            token = only_allowed(state, probe)
            if token is None:
                break
            if vocab.is_eog(token):
                ends = True
                break
    finally:
        state.free()
    whole = run.decode("utf-8", errors="ignore").encode()
    if whole != run:
        return run[: len(whole)] if run.startswith(whole) else b"", False
    return run, ends


def scored_fields(req: Request) -> tuple[list[tuple[str, tuple[str, ...]]], dict[str, str]]:
    """The fields to score, in schema order, and the character that ends each field's value."""
    fields = list(req.schema.get("properties", {}))
    scored = [(name, tuple(req.choices[name])) for name in fields if name in req.choices]
    terminators = {name: ("," if i < len(fields) - 1 else "}") for i, name in enumerate(fields)}
    return scored, terminators


class Decoder:
    """One request's sequence: its prompt, grammar, scoring and output (see the module docstring).

    `n_past` tokens are already in the sequence's cache (a copied shared prefix). A candidate
    literal's evaluation must fit both the sequence's context (`n_ctx`) and `batch_room`.
    """

    def __init__(
        self,
        req: Request,
        tokens: Sequence[int],
        budget: int,
        grammar: Grammar | None,
        vocab: Vocab,
        stats: EngineStats,
        *,
        n_past: int = 0,
        n_ctx: int,
        batch_room: int,
        probe: Probe | None = None,
    ) -> None:
        self.req = req
        self.tokens = list(tokens)
        self.budget = budget
        self.grammar = grammar
        self.vocab = vocab
        self.stats = stats
        self.n_past = n_past
        self.n_ctx = n_ctx
        self.batch_room = batch_room
        self.probe = probe  # forced runs are worked out with it and fed whole (None: token by token)
        self.phase = Phase.PROMPT
        self.result: Result | None = None
        self._pending = self.tokens[n_past:]
        self._feed: list[int] = []
        self._scored, self._terminators = scored_fields(req)
        self.out: list[int] = []
        self.text = b""
        self.likelihoods: dict[str, dict[str, float]] = {}
        self._field = ""
        self._variants: list[_Variant] = []
        self._queue: list[_Variant] = []
        self._decision_logits: np.ndarray | None = None
        self.steps = 0  # evaluations of this sequence after its prompt (DECODE and SCORE feeds)
        if not self._pending:
            raise ValueError("a decoder needs at least one prompt token of its own")
        if budget > 1:  # an answer's forced start (its opening brace) goes with the prompt
            start, _ = self._forced()
            self._pending += self._accept(start[: budget - 1])

    # -- what to evaluate ---------------------------------------------------------------------------

    def feed(self) -> Feed:
        if self.phase is Phase.PROMPT:
            return Feed(Phase.PROMPT, self._pending, "last")
        if self.phase is Phase.DECODE:
            return Feed(Phase.DECODE, self._feed, "last")
        if self.phase is Phase.SCORE:
            return Feed(Phase.SCORE, self._queue[0].tokens[:-1], "all")
        raise RuntimeError("a finished decoder has nothing to feed")

    def evaluated(self, n: int, row: Callable[[int], np.ndarray]) -> None:
        """The first `n` tokens of `feed()` were evaluated; `row(j)` is the logits after the j-th
        (only those the feed asked for). A SCORE feed's cells are the scheduler's to forget from
        `n_past` on."""
        if self.phase is Phase.PROMPT:
            self.n_past += n
            self._pending = self._pending[n:]
            if not self._pending:
                self.phase = Phase.DECODE
                self._advance(row(n - 1))
        elif self.phase is Phase.DECODE:
            self.steps += 1
            self.n_past += n
            self._feed = self._feed[n:]
            if not self._feed:
                self._advance(row(n - 1))
        elif self.phase is Phase.SCORE:
            self.steps += 1
            t0 = time.perf_counter()
            v = self._queue.pop(0)
            for j, nxt in enumerate(v.tokens[1:]):
                v.logp += float(log_softmax(row(j))[nxt])
            self.stats.scoring_s += time.perf_counter() - t0
            if not self._queue:
                self._finish_field()
        else:
            raise RuntimeError("a finished decoder was evaluated")

    # -- decisions --------------------------------------------------------------------------------

    def _advance(self, logits: np.ndarray, *, check_field: bool = True) -> None:
        """Given the logits after the last evaluated token: score a field, or pick the next token."""
        if len(self.out) >= self.budget:
            return self._finish(finished=False)
        if check_field and self._scored and at_value(self.text, self._scored[0][0]):
            return self._start_field(logits)
        if self.grammar is not None:
            token = greedy_allowed(self.grammar, logits, self.stats)
        else:
            token = int(np.argmax(logits))  # no schema: free text
        if self.vocab.is_eog(token):
            return self._finish(finished=True)
        return self._write(self._stop_at_key(token) if check_field and self._scored else [token])

    def _write(self, tokens: list[int]) -> None:
        """Append tokens to the answer (within the budget), then the run the grammar forces after
        them, and feed them all next; when the grammar then allows only the end, the answer ends."""
        tokens = self._accept(tokens)
        ends = False
        if tokens and len(self.out) < self.budget:
            more, ends = self._forced()
            more = self._accept(more)
            if more:
                extra = self.stats.extra
                extra["forced_runs"] = extra.get("forced_runs", 0) + 1
                extra["forced_tokens"] = extra.get("forced_tokens", 0) + len(more)
            tokens = tokens + more
        if len(self.out) >= self.budget:
            return self._finish(finished=False)
        if ends:
            self.stats.extra["forced_ends"] = self.stats.extra.get("forced_ends", 0) + 1
            return self._finish(finished=True)
        self._feed = tokens
        self.phase = Phase.DECODE
        return None

    def _accept(self, tokens: list[int]) -> list[int]:
        """Tokens written to the answer (those within the budget)."""
        tokens = tokens[: self.budget - len(self.out)]
        for tok in tokens:
            if self.grammar is not None:
                self.grammar.accept(tok)
            self.text += self.vocab.piece(tok)
        self.out += tokens
        return tokens

    def _forced(self) -> tuple[list[int], bool]:
        """The tokens of the run the grammar forces from here (never past a scored field's value
        start, where the literals are scored), and whether only the end is left after it."""
        if self.grammar is None or self.probe is None:
            return [], False
        t0 = time.perf_counter()
        name = self._scored[0][0] if self._scored else None
        if name is not None and at_value(self.text, name):
            return [], False

        def stop(run: bytes) -> bool:
            return name is not None and at_value(self.text + run, name)

        run, ends = forced_run(self.grammar, self.probe, self.vocab, stop, min(MAX_FORCED_BYTES, self.batch_room))
        tokens: list[int] = []
        if run:
            tokens = self.vocab.text_tokens(run.decode())
            if b"".join(self.vocab.piece(t) for t in tokens) != run or not self._grammar_takes(tokens):
                tokens, ends = [], False  # a tokenizer that changes the text (a space prefix): token by token
            elif not ends:
                # The run's last token is left to the model: it may merge with what follows (a key's
                # closing quote with the colon, '":'), and a lone '"' puts the model off its tokens.
                tokens = tokens[:-1]
        self.stats.sampling_s += time.perf_counter() - t0
        return tokens, ends

    def _stop_at_key(self, token: int) -> list[int]:
        """The token, or, when it would run past the next scored field's key into its value (a
        merged piece such as `":"` after the key's name), the tokens of the key's end alone, so
        that the value starts at a token boundary and its literals are scored there."""
        key = orjson.dumps(self._scored[0][0]) + b":"
        combined = self.text + self.vocab.piece(token)
        at = combined.find(key, max(0, len(self.text) - len(key) + 1))
        end = at + len(key)
        if at < 0 or combined[end:] in (b"", b" "):
            return [token]
        rest = combined[len(self.text) : end].decode("utf-8", errors="ignore")
        forced = self.vocab.text_tokens(rest) if rest else []
        if forced and (self.grammar is None or self._grammar_takes(forced)):
            self.stats.extra["keys_cut"] = self.stats.extra.get("keys_cut", 0) + 1
            return forced
        return [token]

    def _start_field(self, logits: np.ndarray) -> None:
        """At a scored field's value: first tokens from these logits, the rest queued for evaluation."""
        t0 = time.perf_counter()
        name, literals = self._scored.pop(0)
        logp = log_softmax(logits)
        prefixes = ("", " ") if self.text.endswith(b":") else ("",)
        self._field = name
        self._variants = []
        for literal in literals:
            spellings = [self.vocab.text_tokens(prefix + literal + self._terminators[name]) for prefix in prefixes]
            allowed = [t for t in spellings if self.grammar is None or self.grammar.allowed(t[0])]
            for toks in allowed or spellings:  # a literal the grammar rejects outright is scored all the same
                self._variants.append(_Variant(literal, toks, float(logp[toks[0]])))
        multi = [v for v in self._variants if len(v.tokens) > 1]
        limit = min(self.n_ctx - self.n_past, self.batch_room)
        if any(len(v.tokens) - 1 > limit for v in multi):
            raise RuntimeError("no room left in the sequence's context to score the literals")
        self._queue = multi
        self._decision_logits = np.array(logits, copy=True)
        self.stats.scoring_s += time.perf_counter() - t0
        if self._queue:
            self.phase = Phase.SCORE
            return None
        return self._finish_field()

    def _finish_field(self) -> None:
        """Record the field's likelihoods and force the best literal (grammar permitting)."""
        t0 = time.perf_counter()
        into = self.likelihoods.setdefault(self._field, {})
        best: _Variant | None = None
        by_literal: dict[str, list[float]] = {}
        for v in self._variants:  # literals in order, "" before " "; the first maximum wins
            by_literal.setdefault(v.literal, []).append(v.logp)
            if best is None or v.logp > best.logp:
                best = v
        for literal, values in by_literal.items():
            into[literal] = float(np.logaddexp.reduce(values))
        forced = list(best.tokens) if best is not None else []
        if forced and self.grammar is not None and not self._grammar_takes(forced):
            forced = []
        self.stats.scoring_s += time.perf_counter() - t0
        logits = self._decision_logits
        self._variants, self._queue, self._decision_logits = [], [], None
        if not forced:
            assert logits is not None
            return self._advance(logits, check_field=False)  # a surprise: decode freely
        return self._write(forced)

    def _grammar_takes(self, tokens: Sequence[int]) -> bool:
        """Whether the grammar accepts `tokens` from here (checked on a copy)."""
        assert self.grammar is not None
        probe = self.grammar.clone()
        try:
            for tok in tokens:
                if not probe.allowed(tok):
                    return False
                probe.accept(tok)
            return True
        finally:
            probe.free()

    def _finish(self, *, finished: bool) -> None:
        self.stats.output_tokens += len(self.out)
        extra = self.stats.extra
        extra["answers"] = extra.get("answers", 0) + 1
        extra["answer_steps"] = extra.get("answer_steps", 0) + self.steps
        self.stats.missed_decision_points += len(self._scored)
        self.phase = Phase.DONE
        self.result = Result(
            uid=self.req.uid,
            text=self.text.decode("utf-8", errors="replace"),
            likelihoods=self.likelihoods,
            prompt_tokens=len(self.tokens),
            output_tokens=len(self.out),
            finished=finished,
        )

    def failed(self, err: Exception) -> Result:
        """The result when evaluating this sequence failed."""
        self.phase = Phase.DONE
        self.result = Result(uid=self.req.uid, text="", prompt_tokens=len(self.tokens), error=f"engine error: {err}")
        return self.result

    def close(self) -> None:
        if self.grammar is not None:
            self.grammar.free()
            self.grammar = None
