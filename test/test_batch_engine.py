"""The batched engine on the real default model: same answers as LlamaEngine, refill, budgets, order."""

from __future__ import annotations

import math

import orjson
import pytest
from conftest import DEFAULT_MODEL, needs_model

from extractor.backend import Message, Request
from extractor.batch_engine import BatchedLlamaEngine, _lcp, choose_n_seq
from extractor.engine import EngineOptions, LlamaEngine

SCHEMA = {
    "type": "object",
    "properties": {
        "lesion": {"type": "boolean"},
        "kind": {"enum": ["PDAC", "Other pancreatic disease", "Normal pancreas"]},
        "size_mm": {"type": ["number", "null"]},
    },
    "required": ["lesion", "kind", "size_mm"],
    "additionalProperties": False,
}
REASONING_SCHEMA = {
    "type": "object",
    "properties": {"reasoning": {"type": "string", "maxLength": 40}, **SCHEMA["properties"]},
    "required": ["reasoning", *SCHEMA["required"]],
    "additionalProperties": False,
}
CHOICES = {
    "lesion": ("true", "false"),
    "kind": tuple(orjson.dumps(k).decode() for k in SCHEMA["properties"]["kind"]["enum"]),
}
SYSTEM = (
    "You read pancreas imaging reports. Answer with JSON: lesion (true/false), kind (PDAC, "
    "Other pancreatic disease or Normal pancreas) and size_mm (the lesion size in mm, or null)."
)
REPORTS = [
    "CT: a 32 mm mass in the pancreatic head, suspect PDAC.",
    "MRI: normal pancreas.",
    "MRI: a cyst in the pancreatic tail of 8 mm.",
    "Echo: pancreatitis, no mass, duct 4 mm.",
    "CT abdomen: liver normal. Pancreas head lesion 21 mm, hypodense, encasing the SMA.",
]
OPTIONS = EngineOptions(n_ctx=1024, n_threads=2, gpu="off")


@pytest.fixture(scope="module")
def reference():
    if not DEFAULT_MODEL.is_file():
        pytest.skip("default model missing")
    eng = LlamaEngine(DEFAULT_MODEL, OPTIONS)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def batched():
    if not DEFAULT_MODEL.is_file():
        pytest.skip("default model missing")
    eng = BatchedLlamaEngine(DEFAULT_MODEL, OPTIONS, n_seq=3)
    yield eng
    eng.close()


def request(eng, uid: str, report: str, max_tokens: int = 48, schema=SCHEMA) -> Request:
    msgs = (Message("system", SYSTEM), Message("user", "Report:\n" + report))
    return Request(uid, msgs, eng.chat.render(msgs), 0, schema, max_tokens, CHOICES)


def argmax(lik):
    return {name: max(values, key=values.get) for name, values in lik.items()}


@needs_model
def test_same_answers_as_llama_engine(reference: LlamaEngine, batched: BatchedLlamaEngine) -> None:
    """Exact on a CPU: each sequence's tokens are evaluated in the shapes LlamaEngine uses (decode
    steps one token per sequence, prompt chunks and forced literals in calls of their own), so
    even free text comes out the same although requests share physical batches."""
    reqs = [request(reference, f"r{i}", r, schema=REASONING_SCHEMA, max_tokens=50) for i, r in enumerate(REPORTS)]
    want = {r.uid: r for r in reference.generate(reqs)}
    got = {r.uid: r for r in batched.generate(reqs)}  # 5 requests through 3 sequences
    assert set(got) == set(want)
    for uid, w in want.items():
        g = got[uid]
        assert g.error is None and g.finished == w.finished, g
        assert g.text == w.text and g.output_tokens == w.output_tokens
        assert set(g.likelihoods) == set(w.likelihoods)
        for name, lik in w.likelihoods.items():
            assert g.likelihoods[name] == pytest.approx(lik, abs=1e-3)
    scored = [r for r in got.values() if len(r.likelihoods) == 2]
    assert len(scored) >= 3
    for r in scored:
        assert all(math.isfinite(v) and v < 0 for lik in r.likelihoods.values() for v in lik.values())
    assert batched.stats.prompt_tokens_reused >= len(reqs) * 30  # the shared instructions, copied
    assert batched.stats.greedy_accepted > batched.stats.full_grammar_applies


@needs_model
def test_free_text_without_a_schema(reference: LlamaEngine, batched: BatchedLlamaEngine) -> None:
    reqs = [request(reference, f"t{i}", r, max_tokens=12, schema={}) for i, r in enumerate(REPORTS[:2])]
    want = {r.uid: r for r in reference.generate(reqs)}
    got = {r.uid: r for r in batched.generate(reqs)}
    for uid, w in want.items():
        assert got[uid].text == w.text and got[uid].output_tokens == w.output_tokens
        assert got[uid].likelihoods == {}


@needs_model
def test_refill_answers_every_request_once(batched: BatchedLlamaEngine) -> None:
    reqs = [request(batched, f"u{i}", REPORTS[i % len(REPORTS)] + f" Case {i}.") for i in range(7)]
    results = list(batched.generate(reqs))  # 7 requests through 3 sequences
    assert sorted(r.uid for r in results) == sorted(r.uid for r in reqs)
    for r in results:
        assert r.finished and r.error is None
        answer = orjson.loads(r.text)
        assert list(answer) == ["lesion", "kind", "size_mm"]
        if "kind" in r.likelihoods:  # scored unless the model wrote `"lesion" :` (a missed decision point)
            assert orjson.dumps(answer["kind"]).decode() == argmax(r.likelihoods)["kind"]


@needs_model
def test_token_budget_ends_a_sequence_unfinished(batched: BatchedLlamaEngine, reference: LlamaEngine) -> None:
    reqs = [request(batched, "a", REPORTS[0]), request(batched, "cut", REPORTS[1], max_tokens=5)]
    reqs.append(request(batched, "cut-in-label", REPORTS[2], max_tokens=9))
    got = {r.uid: r for r in batched.generate(reqs)}
    assert got["a"].finished
    assert not got["cut"].finished and got["cut"].output_tokens == 5
    assert not got["cut-in-label"].finished and got["cut-in-label"].output_tokens == 9
    want = next(reference.generate([reqs[2]]))
    assert got["cut-in-label"].text == want.text


@needs_model
def test_a_much_longer_report_is_prefilled_over_several_steps(
    batched: BatchedLlamaEngine, reference: LlamaEngine
) -> None:
    long_report = " ".join(["The pancreas shows no focal lesion, the duct is not dilated."] * 42)
    long_report += " Conclusion: a 15 mm cyst in the pancreatic body."
    reqs = [request(batched, "short", REPORTS[1]), request(batched, "long", long_report)]
    assert len(batched.chat.tokenize(reqs[1].prompt)) > 560  # more than one 512-token prompt chunk
    got = {r.uid: r for r in batched.generate(reqs)}
    want = next(reference.generate([reqs[1]]))
    assert got["long"].finished and got["short"].finished
    assert got["long"].text == want.text
    for name, lik in want.likelihoods.items():
        assert got["long"].likelihoods[name] == pytest.approx(lik, abs=1e-3)


@needs_model
def test_results_are_yielded_as_they_finish(batched: BatchedLlamaEngine) -> None:
    reqs = [
        request(batched, "slow", REPORTS[0], schema=REASONING_SCHEMA, max_tokens=50),
        request(batched, "slow2", REPORTS[4], schema=REASONING_SCHEMA, max_tokens=50),
        request(batched, "quick", REPORTS[1], max_tokens=3),
    ]
    stream = batched.generate(reqs)
    first = next(stream)
    assert first.uid == "quick" and first.output_tokens == 3
    rest = list(stream)
    assert sorted(r.uid for r in rest) == ["slow", "slow2"]


@needs_model
def test_oversized_prompt_and_an_abandoned_stream_leave_the_engine_usable(batched: BatchedLlamaEngine) -> None:
    reqs = [request(batched, "big", "word " * 3000), request(batched, "ok", REPORTS[1])]
    results = {r.uid: r for r in batched.generate(reqs)}
    assert results["big"].error and not results["big"].finished
    assert results["ok"].finished
    stream = batched.generate([request(batched, f"x{i}", r) for i, r in enumerate(REPORTS)])
    next(stream)
    stream.close()  # the consumer stops early: sequences and grammar clones are released
    again = next(batched.generate([request(batched, "ok", REPORTS[1])]))
    assert again.text == results["ok"].text


@needs_model
def test_the_gpu_plan_mixes_everything_into_one_call_and_stays_valid() -> None:
    """exact=False (the default on a GPU): one llama_decode per step, forced literals token by token."""
    eng = BatchedLlamaEngine(DEFAULT_MODEL, OPTIONS, n_seq=3, exact=False)
    try:
        reqs = [request(eng, f"m{i}", r) for i, r in enumerate(REPORTS)]
        results = {r.uid: r for r in eng.generate(reqs)}
        assert eng.stats.extra["calls"] == eng.stats.extra["steps"]
    finally:
        eng.close()
    assert set(results) == {r.uid for r in reqs}
    for r in results.values():
        assert r.finished and r.error is None
        answer = orjson.loads(r.text)
        assert list(answer) == ["lesion", "kind", "size_mm"]
        for name, best in argmax(r.likelihoods).items():
            assert orjson.dumps(answer[name]).decode() == best


def test_parallel_sequences_follow_the_flag_then_memory() -> None:
    assert choose_n_seq(5, False, 1024, 23040, None) == 5
    assert choose_n_seq(0, False, 1024, 23040, None) == 8
    assert choose_n_seq(0, True, 1024, 23040, None) == 16
    # 4 GiB free, 1 GiB per sequence: half of it holds the prefix sequence and one slot
    assert choose_n_seq(0, True, 4096, 1 << 18, 4 << 30) == 1
    assert choose_n_seq(0, False, 256, 1 << 10, 1 << 40) == 8


def test_longest_common_prefix() -> None:
    import numpy as np

    a = np.array([1, 2, 3, 4], dtype=np.intc)
    assert _lcp(a, np.array([1, 2, 9], dtype=np.intc)) == 2
    assert _lcp(a, a[:2]) == 2
    assert _lcp(a, np.zeros(0, dtype=np.intc)) == 0
