"""The per-sequence decoder without a model: fake vocabulary, fake grammar, scripted logits."""

from __future__ import annotations

import numpy as np
import pytest

from extractor.backend import Request
from extractor.decoder import (
    QUICK_BYTES,
    Decoder,
    EngineStats,
    Phase,
    Probe,
    at_value,
    byte_probe,
    forced_run,
    greedy_allowed,
    log_softmax,
    only_allowed,
)

EOG = 0
PIECES = ["<eog>", "{", "}", '"', ":", ",", " ", "true", "false", '"lesion"', '"kind"', "PD", "AC", "Other", "x"]
# "kind" and '":"' let a model write a key's name and run past its colon in one merged piece.
PIECES += ["kind", '":"']
PIECES += [chr(c) for c in range(ord("a"), ord("z") + 1) if chr(c) not in PIECES]
PIECES += [chr(c) for c in range(ord(" "), ord("~") + 1) if chr(c) not in PIECES]  # every printable character
ID = {p: i for i, p in enumerate(PIECES)}
# The fake vocabulary's alphabet is printable ASCII: one token per character, and the end.
PROBE = Probe(
    np.array(sorted([EOG] + [i for i, p in enumerate(PIECES) if len(p) == 1]), dtype=np.intc),
    tuple(ID[chr(b)] for b in QUICK_BYTES),
)

SCHEMA = {"type": "object", "properties": {"lesion": {"type": "boolean"}, "kind": {"enum": ["PDAC", "Other"]}}}
CHOICES = {"lesion": ("true", "false"), "kind": ('"PDAC"', '"Other"')}


class FakeVocab:
    """Greedy longest-match tokenizer over PIECES; token 0 ends generation."""

    def text_tokens(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            piece = max((p for p in PIECES[1:] if text.startswith(p, i)), key=len)
            out.append(ID[piece])
            i += len(piece)
        return out

    def piece(self, token: int) -> bytes:
        return b"" if token == EOG else PIECES[token].encode()

    def is_eog(self, token: int) -> bool:
        return token == EOG


class FakeGrammar:
    """Allows exactly the prefixes of a set of complete answers (and EOG once one is complete)."""

    live = 0

    def __init__(self, answers: set[str], text: str = "") -> None:
        self.answers, self.text = answers, text
        FakeGrammar.live += 1

    def allowed(self, token: int) -> bool:
        if token == EOG:
            return self.text in self.answers
        nxt = self.text + PIECES[token]
        return any(a.startswith(nxt) for a in self.answers)

    def best_allowed(self, ids: np.ndarray, logits: np.ndarray) -> int | None:
        ok = [(float(lg), -int(i)) for i, lg in zip(ids, logits, strict=True) if self.allowed(int(i))]
        return -max(ok)[1] if ok else None

    def accept(self, token: int) -> None:
        assert self.allowed(token), (self.text, PIECES[token])
        self.text += PIECES[token] if token != EOG else ""

    def clone(self) -> FakeGrammar:
        return FakeGrammar(self.answers, self.text)

    def free(self) -> None:
        FakeGrammar.live -= 1


class ScriptedLM:
    """Logits as a function of the text written so far: `script[text]` = {piece: logit}; otherwise
    the next piece of the first target the text starts, or EOG at a target's end."""

    def __init__(self, targets: list[str], script: dict[str, dict[str, float]] | None = None) -> None:
        self.targets, self.script = targets, script or {}
        self.seen: list[str] = []

    def logits(self, text: str) -> np.ndarray:
        self.seen.append(text)
        v = np.zeros(len(PIECES), dtype=np.float32)
        if text in self.script:
            for piece, value in self.script[text].items():
                v[ID[piece]] = value
            return v
        for t in self.targets:
            if t == text:
                v[EOG] = 4.0
                return v
            if t.startswith(text):
                v[FakeVocab().text_tokens(t[len(text) :])[0]] = 4.0
                return v
        return v


def run(dec: Decoder, lm: ScriptedLM, *, prompt_chunk: int | None = None) -> list[Phase]:
    """Play the scheduler: evaluate what the decoder feeds, hand back the scripted logits (a
    function of the text after the prompt: an answer's forced start is fed with the prompt)."""
    vocab = FakeVocab()
    cache = list(dec.tokens[: dec.n_past])  # the tokens evaluated so far (candidate literals are forgotten)
    phases = []
    while dec.result is None:
        feed = dec.feed()
        phases.append(feed.phase)
        toks = list(feed.tokens)
        n = min(len(toks), prompt_chunk or len(toks)) if feed.phase is Phase.PROMPT else len(toks)

        def row(j: int, seen: list[int] = cache + toks, at: int = len(cache)) -> np.ndarray:
            after_prompt = seen[len(dec.tokens) : at + j + 1]
            return lm.logits("".join(vocab.piece(t).decode() for t in after_prompt))

        dec.evaluated(n, row)
        if feed.phase is not Phase.SCORE:
            cache += toks[:n]
    return phases


def decoder(
    answers: set[str] | None, max_tokens: int = 64, schema=SCHEMA, choices=CHOICES, *, forced: bool = False
) -> Decoder:
    req = Request("u", (), "", 0, schema, max_tokens, choices)
    grammar = FakeGrammar(answers) if answers is not None else None
    probe = PROBE if forced else None
    return Decoder(
        req, [1, 2, 3, 4], max_tokens, grammar, FakeVocab(), EngineStats(), n_ctx=512, batch_room=32, probe=probe
    )


def answers(space: bool = False) -> set[str]:
    sep = ": " if space else ":"
    return {f'{{"lesion"{sep}{b},"kind"{sep}{k}}}' for b in ("true", "false") for k in ('"PDAC"', '"Other"')}


def lp(lm: ScriptedLM, text: str, pieces: list[str]) -> float:
    """The log-probability of `pieces` after `text`, from the scripted logits."""
    total = 0.0
    for p in pieces:
        total += float(log_softmax(lm.logits(text))[ID[p]])
        text += p
    return total


def test_scores_every_literal_and_forces_the_most_likely() -> None:
    lm = ScriptedLM(['{"lesion":true,"kind":"PDAC"}'], {'{"lesion":': {"false": 2.0, "true": 1.0}})
    lm.targets.append('{"lesion":false,"kind":"PDAC"}')
    dec = decoder(answers() | answers(space=True))  # a grammar that allows a space after the colon
    phases = run(dec, lm)
    r = dec.result
    assert r is not None and r.finished
    assert r.text == '{"lesion":false,"kind":"PDAC"}'  # the scored best, not the first target
    lik = r.likelihoods["lesion"]
    # Both spellings after the colon ("" and " "), each with its terminator, summed in probability.
    want_false = np.logaddexp(lp(lm, '{"lesion":', ["false", ","]), lp(lm, '{"lesion":', [" ", "false", ","]))
    want_true = np.logaddexp(lp(lm, '{"lesion":', ["true", ","]), lp(lm, '{"lesion":', [" ", "true", ","]))
    assert lik["false"] == pytest.approx(want_false, abs=1e-6)
    assert lik["true"] == pytest.approx(want_true, abs=1e-6)
    # The last field ends with "}"; its multi-token literals ("PD" "AC") were evaluated as SCORE feeds.
    kind = r.likelihoods["kind"]
    assert kind['"PDAC"'] == pytest.approx(
        np.logaddexp(
            lp(lm, '{"lesion":false,"kind":', ['"', "PD", "AC", '"', "}"]),
            lp(lm, '{"lesion":false,"kind":', [" ", '"', "PD", "AC", '"', "}"]),
        ),
        abs=1e-6,
    )
    assert max(kind, key=kind.get) == '"PDAC"'
    assert Phase.SCORE in phases and dec.stats.missed_decision_points == 0
    dec.close()
    assert FakeGrammar.live == 0  # probes and the sequence's grammar are all freed


def test_single_token_literals_need_no_evaluation() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "boolean"}}}
    lm = ScriptedLM(["{x:true}"], {"{x:": {"true": 1.0, "false": 3.0}, "{x:false": {"}": 5.0}})
    vocab_answers = {"{x:true}", "{x:false}"}
    req = Request("u", (), "", 0, schema, 20, {"x": ("true", "false")})
    # The key is not JSON-quoted here, so scoring never triggers: a missed decision point.
    dec = Decoder(req, [1, 2], 20, FakeGrammar(vocab_answers), FakeVocab(), EngineStats(), n_ctx=64, batch_room=8)
    run(dec, lm)
    assert dec.result is not None and dec.result.likelihoods == {}
    assert dec.stats.missed_decision_points == 1
    dec.close()


def test_only_the_spellings_the_grammar_allows_are_scored() -> None:
    # The model prefers " false," (with a space) but the grammar allows no space after the colon:
    # the spaced spellings are not scored, so the scores and the answer agree on "true".
    script = {'{"lesion":': {" ": 5.0, "true": 1.0}, '{"lesion": ': {"false": 5.0}, '{"lesion": false': {",": 5.0}}
    lm = ScriptedLM(['{"lesion":true,"kind":"Other"}'], script)
    dec = decoder(answers(space=False))
    run(dec, lm)
    r = dec.result
    assert r is not None and r.finished
    assert r.text == '{"lesion":true,"kind":"Other"}'
    lik = r.likelihoods["lesion"]
    assert lik["true"] == pytest.approx(lp(lm, '{"lesion":', ["true", ","]), abs=1e-6)
    assert lik["false"] == pytest.approx(lp(lm, '{"lesion":', ["false", ","]), abs=1e-6)
    assert max(lik, key=lik.get) == "true"
    dec.close()


def test_a_forced_literal_the_grammar_rejects_falls_back_to_free_decoding() -> None:
    # The grammar takes the first token of "false," but not the comma after it (a stand-in for a
    # literal that tokenises past what the grammar allows): the best literal cannot be forced.
    grammar_answers = answers() | {'{"lesion":false;"kind":"Other"}'}
    grammar_answers -= {a for a in answers() if a.startswith('{"lesion":false,')}
    script = {'{"lesion":': {"false": 5.0, "true": 1.0}}
    lm = ScriptedLM(['{"lesion":true,"kind":"Other"}'], script)
    dec = decoder(grammar_answers)
    run(dec, lm)
    r = dec.result
    assert r is not None and r.finished
    assert r.text == '{"lesion":false;"kind":"Other"}'  # greedy under the grammar after the fallback
    lik = r.likelihoods["lesion"]
    assert max(lik, key=lik.get) == "false"
    dec.close()


def test_budget_exhaustion_ends_unfinished_and_cuts_a_forced_literal() -> None:
    lm = ScriptedLM(['{"lesion":true,"kind":"PDAC"}'])
    dec = decoder(answers(), max_tokens=5)  # { "lesion" : then the forced literal is cut to 2 of 3 tokens
    run(dec, lm)
    r = dec.result
    assert r is not None and not r.finished and r.output_tokens == 5
    assert r.text == '{"lesion":true,'
    assert dec.stats.output_tokens == 5 and dec.stats.missed_decision_points == 1  # "kind" never reached
    dec.close()


def test_end_of_generation_and_prompt_fed_in_chunks() -> None:
    lm = ScriptedLM(['{"lesion":true,"kind":"PDAC"}'])
    dec = decoder(answers())
    phases = run(dec, lm, prompt_chunk=2)
    assert phases[:2] == [Phase.PROMPT, Phase.PROMPT]  # 4 prompt tokens, 2 at a time
    r = dec.result
    assert r is not None and r.finished and r.text == '{"lesion":true,"kind":"PDAC"}'
    assert dec.n_past == 4 + r.output_tokens - 0  # every output token was evaluated (forced ones included)
    with pytest.raises(RuntimeError):
        dec.feed()
    dec.close()


def test_free_text_without_a_grammar_stops_at_the_budget() -> None:
    lm = ScriptedLM(["abcdefgh"])
    dec = decoder(None, max_tokens=3, schema={}, choices={})
    run(dec, lm)
    assert dec.result is not None and dec.result.text == "abc" and not dec.result.finished


def test_greedy_under_the_grammar_checks_tiers_then_the_whole_vocabulary() -> None:
    stats = EngineStats()
    grammar = FakeGrammar({"x"})
    logits = np.zeros(len(PIECES), dtype=np.float32)
    logits[ID["true"]] = 9.0  # the greedy token, not allowed
    logits[ID["x"]] = -1.0
    assert greedy_allowed(grammar, logits, stats) == ID["x"]
    assert stats.greedy_accepted == 0 and stats.full_grammar_applies == 1  # vocab < 64: straight to the full scan
    logits[ID["x"]] = 10.0
    assert greedy_allowed(grammar, logits, stats) == ID["x"] and stats.greedy_accepted == 1
    grammar.free()


def test_no_room_to_score_a_literal_is_an_error() -> None:
    lm = ScriptedLM(['{"lesion":true,"kind":"PDAC"}'])
    req = Request("u", (), "", 0, SCHEMA, 64, CHOICES)
    dec = Decoder(req, [1, 2], 64, FakeGrammar(answers()), FakeVocab(), EngineStats(), n_ctx=512, batch_room=1)
    with pytest.raises(RuntimeError, match="no room"):
        run(dec, lm)
    dec.close()


def test_a_piece_running_past_a_key_into_its_value_is_cut_so_the_value_is_scored() -> None:
    """Real vocabularies merge `":"` (the key's closing quote, the colon and the value's opening
    quote); greedy decoding then never stands at the value's start and the label went unscored.
    The decoder feeds the key's end alone instead, and scores the literals from there."""
    script = {'{"lesion":true,': {'"': 6.0}, '{"lesion":true,"': {"kind": 6.0}, '{"lesion":true,"kind': {'":"': 6.0}}
    lm = ScriptedLM(['{"lesion":true,"kind":"Other"}'], script)
    dec = decoder({'{"lesion":true,"kind":"PDAC"}', '{"lesion":true,"kind":"Other"}'})
    run(dec, lm)
    assert dec.result is not None and dec.result.finished
    assert set(dec.result.likelihoods) == {"lesion", "kind"}
    assert set(dec.result.likelihoods["kind"]) == {'"PDAC"', '"Other"'}
    assert dec.result.text in ('{"lesion":true,"kind":"PDAC"}', '{"lesion":true,"kind":"Other"}')
    assert dec.stats.extra["keys_cut"] == 1 and dec.stats.missed_decision_points == 0
    dec.close()


# -- forced runs ------------------------------------------------------------------------------------


def test_only_allowed_names_the_single_allowed_token() -> None:
    grammar = FakeGrammar({'{"lesion":true}', '{"lesion":false}'}, '{"les')
    assert only_allowed(grammar, PROBE) == ID["i"]
    grammar.text = '{"lesion":'  # "t" or "f": a choice
    assert only_allowed(grammar, PROBE) is None
    grammar.text = '{"lesion":true}'  # complete: only the end
    assert only_allowed(grammar, PROBE) == EOG
    grammar.text = '{"lesion":tru'  # a quick token ("e") is the only one: one check of the others
    assert only_allowed(grammar, PROBE) == ID["e"]
    grammar.free()


def test_where_the_model_chooses_two_quick_tokens_settle_it_without_a_full_check() -> None:
    class Counting(FakeGrammar):
        full = 0

        def best_allowed(self, ids: np.ndarray, logits: np.ndarray) -> int | None:
            Counting.full += 1
            return super().best_allowed(ids, logits)

    grammar = Counting({'{"note":"' + "e" * 9 + '"}', '{"note":"' + "a " * 4 + '"}'}, '{"note":"')
    assert only_allowed(grammar, PROBE) is None and Counting.full == 0
    grammar.free()


def test_a_forced_run_ends_where_the_grammar_leaves_a_choice_or_at_a_scored_value() -> None:
    vocab = FakeVocab()
    grammar = FakeGrammar(answers(), '{"')  # no space allowed anywhere: the key and its colon are forced
    assert forced_run(grammar, PROBE, vocab, lambda run: False) == (b'lesion":', False)
    # A scored field's value starts after the colon: the run stops there even when the value is forced.
    single = FakeGrammar({'{"lesion":true,"kind":"PDAC"}'}, '{"')
    stop = lambda run: at_value(b'{"' + run, "lesion")  # noqa: E731
    assert forced_run(single, PROBE, vocab, stop) == (b'lesion":', False)
    assert forced_run(single, PROBE, vocab, lambda run: False) == (b'lesion":true,"kind":"PDAC"}', True)
    assert forced_run(single, PROBE, vocab, lambda run: False, limit=3) == (b"les", False)
    spaced = FakeGrammar(answers() | answers(space=True), '{"lesion"')  # ":" or ": ": a choice after the colon
    assert forced_run(spaced, PROBE, vocab, lambda run: False) == (b":", False)
    for g in (grammar, single, spaced):
        g.free()
    assert FakeGrammar.live == 0  # the probing copies are freed


def test_forced_runs_are_fed_whole_and_change_no_text_or_likelihood() -> None:
    """With logits that depend on the text alone, feeding the forced runs whole writes the same
    answer with the same likelihoods in fewer evaluations; every forced token is still evaluated."""
    lm = ScriptedLM(['{"lesion":true,"kind":"PDAC"}'], {'{"lesion":': {"false": 2.0, "true": 1.0}})
    lm.targets.append('{"lesion":false,"kind":"PDAC"}')
    results, steps = [], []
    for forced in (False, True):
        dec = decoder(answers(), forced=forced)
        phases = run(dec, lm)
        assert dec.result is not None and dec.result.finished
        results.append(dec.result)
        steps.append(dec.steps)
        assert dec.steps == sum(p is not Phase.PROMPT for p in phases)
        dec.close()
    old, new = results
    assert new.text == old.text == '{"lesion":false,"kind":"PDAC"}'
    assert new.likelihoods == old.likelihoods
    # Token by token, every written token costs an evaluation, and each field 2 (its candidates in
    # the one spelling the grammar allows, no space after the colon).
    # Forced: '{"lesion"' goes with the prompt (the answer's forced start '{"lesion":' but its last
    # token, which the model writes), the literal 'false,' carries '"kind"' (the run '"kind":' but
    # its last token), and the end is forced after the last literal, which is never evaluated.
    assert steps == [11, 7]
    assert new.output_tokens == old.output_tokens  # the same tokens: the fake tokenizer splits runs as greedy did
    assert FakeGrammar.live == 0


def test_a_forced_end_finishes_without_evaluating_the_last_tokens() -> None:
    lm = ScriptedLM(['{"lesion":true,"kind":"PDAC"}'])
    dec = decoder(answers(), forced=True)
    run(dec, lm)
    r = dec.result
    assert r is not None and r.finished and r.text == '{"lesion":true,"kind":"PDAC"}'
    assert dec.stats.extra["forced_ends"] == 1
    assert dec.n_past < 4 + r.output_tokens  # the forced literal '"PDAC"}' was written, not evaluated
    dec.close()


def test_the_budget_cuts_a_forced_run_and_ends_unfinished() -> None:
    lm = ScriptedLM(['{"lesion":true,"kind":"PDAC"}'])
    dec = decoder(answers(), max_tokens=2, forced=True)  # "{", then the run '"lesion":' cut to '"lesion"'
    run(dec, lm)
    r = dec.result
    assert r is not None and not r.finished and r.output_tokens == 2 and r.text == '{"lesion"'
    dec.close()


def test_without_a_grammar_nothing_is_forced() -> None:
    lm = ScriptedLM(["abcdefgh"])
    dec = decoder(None, max_tokens=3, schema={}, choices={}, forced=True)
    run(dec, lm)
    assert dec.result is not None and dec.result.text == "abc" and dec.steps == 2
    assert "forced_tokens" not in dec.stats.extra


class ByteVocab:
    """Bytes as tokens: token b + 1 is byte b, token 0 the end; the `missing` byte has no token of
    its own (its token is that byte and a "y")."""

    def __init__(self, missing: int | None = None) -> None:
        self.missing = missing

    def piece(self, token: int) -> bytes:
        if token == 0:
            return b""
        byte = bytes([token - 1])
        return byte + b"y" if token - 1 == self.missing else byte

    def text_tokens(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def is_eog(self, token: int) -> bool:
        return token == 0


class ByteGrammar(FakeGrammar):
    """FakeGrammar over byte tokens."""

    def allowed(self, token: int) -> bool:
        text = self.text.encode("utf-8", errors="surrogateescape")
        if token == 0:
            return text in self.bytes_answers
        return any(a.startswith(text + bytes([token - 1])) for a in self.bytes_answers)

    @property
    def bytes_answers(self) -> set[bytes]:
        return {a.encode() for a in self.answers}

    def accept(self, token: int) -> None:
        assert self.allowed(token)
        if token:
            self.text = (self.text.encode("utf-8", errors="surrogateescape") + bytes([token - 1])).decode(
                "utf-8", errors="surrogateescape"
            )

    def clone(self) -> ByteGrammar:
        return ByteGrammar(self.answers, self.text)


def test_the_byte_probe_covers_every_byte_or_is_off() -> None:
    probe = byte_probe(ByteVocab(), 257, [0])
    assert probe is not None and list(probe.ids) == list(range(257))
    assert probe.quick == tuple(b + 1 for b in QUICK_BYTES)
    assert byte_probe(ByteVocab(missing=ord("x")), 257, [0]) is None  # "x" could not be asked about
    # A byte no token starts (0xFF: never in UTF-8) needs no probe token.
    probe = byte_probe(ByteVocab(), 256, [0])
    assert probe is not None and list(probe.ids) == list(range(256))


def test_a_forced_run_is_cut_to_whole_characters() -> None:
    vocab = ByteVocab()
    probe = byte_probe(vocab, 257, [0])
    assert probe is not None
    grammar = ByteGrammar({"size: 5 µm"})  # the micro sign is two bytes
    assert forced_run(grammar, probe, vocab, lambda run: False, limit=9) == (b"size: 5 ", False)
    assert forced_run(grammar, probe, vocab, lambda run: False) == ("size: 5 µm".encode(), True)
    grammar.free()


def test_an_answers_forced_start_is_fed_with_the_prompt() -> None:
    dec = decoder(answers(), forced=True)
    feed = dec.feed()
    # The forced start is '{"lesion":'; its last token (':') is left to the model, since a real
    # vocabulary merges it with what follows.
    assert feed.phase is Phase.PROMPT and list(feed.tokens) == [1, 2, 3, 4, ID["{"], ID['"lesion"']]
    assert dec.text == b'{"lesion"' and dec.tokens == [1, 2, 3, 4]  # the prompt itself is unchanged
    dec.close()
    spaced = decoder(answers() | {a.replace("{", "{ ") for a in answers()}, forced=True)
    assert list(spaced.feed().tokens) == [1, 2, 3, 4]  # only '{' is forced: the model writes it
    spaced.close()


def test_a_value_starts_after_the_key_and_colon_with_the_spaces_the_grammar_allows() -> None:
    for text in (b'{"kind":', b'{"kind": ', b'{"kind" :', b'{"kind" : '):
        assert at_value(text, "kind"), text
    assert not at_value(b'{"kind"', "kind") and not at_value(b'{"kinds":', "kind")
