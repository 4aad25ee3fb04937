"""The per-sequence decoder without a model: fake vocabulary, fake grammar, scripted logits."""

from __future__ import annotations

import numpy as np
import pytest

from extractor.backend import Request
from extractor.decoder import Decoder, EngineStats, Phase, greedy_allowed, log_softmax

EOG = 0
PIECES = ["<eog>", "{", "}", '"', ":", ",", " ", "true", "false", '"lesion"', '"kind"', "PD", "AC", "Other", "x"]
# "kind" and '":"' let a model write a key's name and run past its colon in one merged piece.
PIECES += ["kind", '":"']
PIECES += [chr(c) for c in range(ord("a"), ord("z") + 1) if chr(c) not in PIECES]
ID = {p: i for i, p in enumerate(PIECES)}

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
    """Play the scheduler: evaluate what the decoder feeds, hand back the scripted logits."""
    vocab = FakeVocab()
    written = ""  # the text of the tokens evaluated so far (the cache, after the prompt)
    phases = []
    while dec.result is None:
        feed = dec.feed()
        phases.append(feed.phase)
        toks = list(feed.tokens)
        if feed.phase is Phase.PROMPT:
            n = min(len(toks), prompt_chunk or len(toks))
            dec.evaluated(n, lambda j: lm.logits(""))
            continue
        base = written

        def row(j: int, base: str = base, toks: list[int] = toks) -> np.ndarray:
            return lm.logits(base + "".join(vocab.piece(t).decode() for t in toks[: j + 1]))

        dec.evaluated(len(toks), row)
        if feed.phase is Phase.DECODE:
            written += "".join(vocab.piece(t).decode() for t in toks)
    return phases


def decoder(answers: set[str] | None, max_tokens: int = 64, schema=SCHEMA, choices=CHOICES) -> Decoder:
    req = Request("u", (), "", 0, schema, max_tokens, choices)
    grammar = FakeGrammar(answers) if answers is not None else None
    return Decoder(req, [1, 2, 3, 4], max_tokens, grammar, FakeVocab(), EngineStats(), n_ctx=512, batch_room=32)


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
    dec = decoder(answers())
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


def test_a_forced_literal_the_grammar_rejects_falls_back_to_free_decoding() -> None:
    # The model prefers " false," (with a space) but the grammar allows no space after the colon.
    script = {'{"lesion":': {" ": 5.0, "true": 1.0}, '{"lesion": ': {"false": 5.0}}
    lm = ScriptedLM(['{"lesion":true,"kind":"Other"}'], script)
    dec = decoder(answers(space=False))
    run(dec, lm)
    r = dec.result
    assert r is not None and r.finished
    assert r.text == '{"lesion":true,"kind":"Other"}'  # greedy under the grammar: "true" (the space is not allowed)
    lik = r.likelihoods["lesion"]
    assert max(lik, key=lik.get) == "false"  # the scores still say what the model preferred
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
