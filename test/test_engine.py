"""The llama.cpp engine on the real default model (SmolLM2-135M): grammar, scores, cache, budget."""

from __future__ import annotations

import math

import orjson
import pytest
from conftest import DEFAULT_MODEL, needs_model

from extractor import engine as engine_mod
from extractor.backend import Message, Request
from extractor.engine import EngineError, EngineOptions, LlamaEngine, gpu_layers, schema_to_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string", "maxLength": 80},
        "lesion": {"type": "boolean"},
        "kind": {"enum": ["PDAC", "Other pancreatic disease", "Normal pancreas"]},
        "size_mm": {"type": ["number", "null"]},
    },
    "required": ["reasoning", "lesion", "kind", "size_mm"],
    "additionalProperties": False,
}
CHOICES = {
    "lesion": ("true", "false"),
    "kind": tuple(orjson.dumps(k).decode() for k in SCHEMA["properties"]["kind"]["enum"]),
}
SYSTEM = "Answer with JSON: reasoning, lesion (true/false), kind, size_mm (number or null)."


@pytest.fixture(scope="module")
def engine():
    if not DEFAULT_MODEL.is_file():
        pytest.skip("default model missing")
    eng = LlamaEngine(DEFAULT_MODEL, EngineOptions(n_ctx=1024, n_threads=2, gpu="off"))
    yield eng
    eng.close()


def request(eng: LlamaEngine, uid: str, report: str, max_tokens: int = 120) -> Request:
    msgs = (Message("system", SYSTEM), Message("user", "Report:\n" + report))
    prompt = eng.chat.render(msgs)
    return Request(uid, msgs, prompt, 0, SCHEMA, max_tokens, CHOICES)


@needs_model
def test_output_follows_the_schema_and_scores_every_choice(engine: LlamaEngine) -> None:
    result = next(engine.generate([request(engine, "a", "CT: a 32 mm mass in the pancreatic head, suspect PDAC.")]))
    assert result.finished, result.text
    answer = orjson.loads(result.text)
    assert list(answer) == ["reasoning", "lesion", "kind", "size_mm"] and len(answer["reasoning"]) <= 80
    assert set(result.likelihoods) == {"lesion", "kind"}
    assert set(result.likelihoods["kind"]) == set(CHOICES["kind"])
    assert all(math.isfinite(v) and v < 0 for lik in result.likelihoods.values() for v in lik.values())
    # The written value is the most likely allowed literal.
    best = max(result.likelihoods["kind"], key=result.likelihoods["kind"].get)
    assert orjson.dumps(answer["kind"]).decode() == best
    assert ("true" if answer["lesion"] else "false") == max(
        result.likelihoods["lesion"], key=result.likelihoods["lesion"].get
    )


@needs_model
def test_shared_prefix_is_reused_and_greedy_is_deterministic(engine: LlamaEngine) -> None:
    before = engine.stats.prompt_tokens_reused
    r1 = next(engine.generate([request(engine, "a", "MRI: normal pancreas.")]))
    r2 = next(engine.generate([request(engine, "b", "MRI: a cyst in the pancreatic tail of 8 mm.")]))
    r3 = next(engine.generate([request(engine, "a", "MRI: normal pancreas.")]))
    assert engine.stats.prompt_tokens_reused - before >= 2 * 30  # the system prompt, twice
    assert r1.text == r3.text
    for name, lik in r1.likelihoods.items():
        assert lik == pytest.approx(r3.likelihoods[name], abs=0.1)
    assert r2.uid == "b"
    assert engine.stats.greedy_accepted > engine.stats.full_grammar_applies


@needs_model
def test_token_budget_stops_generation_unfinished(engine: LlamaEngine) -> None:
    result = next(engine.generate([request(engine, "a", "CT: mass.", max_tokens=5)]))
    assert not result.finished and result.output_tokens == 5


@needs_model
def test_a_prompt_larger_than_the_context_is_an_error_result(engine: LlamaEngine) -> None:
    result = next(engine.generate([request(engine, "big", "word " * 3000)]))
    assert result.error and not result.finished


def test_unconvertible_schema_fails_at_start_up() -> None:
    with pytest.raises(EngineError, match="cannot convert"):
        schema_to_grammar({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})


def test_visible_gpu_without_offload_support_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "nvidia_gpu_visible", lambda: "Tesla T4, 15360 MiB")
    monkeypatch.setattr(engine_mod.llama_cpp, "llama_supports_gpu_offload", lambda: False)
    with pytest.raises(EngineError, match="no GPU offload support"):
        gpu_layers(EngineOptions())
    assert gpu_layers(EngineOptions(allow_cpu=True)) == 0
    monkeypatch.setattr(engine_mod.llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert gpu_layers(EngineOptions()) == -1
