"""bench/random_gguf.py: the stand-in model for GPU throughput runs loads and answers valid JSON."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import orjson
from conftest import DEFAULT_MODEL, REPO, needs_model

sys.path.insert(0, str(REPO / "bench"))

import random_gguf  # noqa: E402

from extractor.backend import Message, Request  # noqa: E402
from extractor.engine import Engine, EngineOptions  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"finding": {"type": "boolean"}, "grade": {"enum": ["low", "high"]}, "size": {"type": "number"}},
    "required": ["finding", "grade", "size"],
    "additionalProperties": False,
}


@needs_model
def test_a_random_model_with_a_padded_vocabulary_answers_by_the_schema(tmp_path: Path) -> None:
    preset = replace(random_gguf.PRESETS["tiny"], n_vocab=49152 + 100)  # the default model's 49152, padded
    path = random_gguf.write(tmp_path / "random.gguf", preset, DEFAULT_MODEL)
    engine = Engine(path, EngineOptions(n_ctx=512, n_threads=1, gpu="off"), n_seq=2)
    try:
        assert engine.n_vocab == 49152 + 100
        requests = []
        for i in range(3):
            msgs = (Message("system", "Answer in JSON."), Message("user", f"Report {i}: a small lesion."))
            requests.append(
                Request(f"r{i}", msgs, engine.chat.render(msgs), 0, SCHEMA, 48, {"finding": ("true", "false")})
            )
        results = list(engine.generate(requests))
    finally:
        engine.close()
    assert sorted(r.uid for r in results) == ["r0", "r1", "r2"]
    for r in results:
        if r.finished:  # a random model may spend its budget on digits; what it wrote must parse then
            assert set(orjson.loads(r.text)) == {"finding", "grade", "size"}
        assert set(r.likelihoods.get("finding", {})) <= {"true", "false"}
    assert any(r.finished for r in results)
