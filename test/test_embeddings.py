"""The embedding pass: packing and pooling (no model), the on-disk cache, the flag, and on the
default model the vectors themselves and a job run with the embedding head among the candidates."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from conftest import DEFAULT_MODEL, needs_model

import process
from extractor.embeddings import (
    CachedEmbedder,
    Embedder,
    cache_path,
    embedding_head_wanted,
    mean_pool,
    model_key,
    pack,
    text_key,
)

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_learnable_jobs import write_jobs  # noqa: E402

# -- packing and pooling ----------------------------------------------------------------------------


def test_pack_keeps_order_and_whole_texts_within_capacity_and_sequences() -> None:
    lengths = [5, 3, 4, 1, 6, 2, 2, 2]
    batches = pack(lengths, capacity=8, max_seqs=3)
    assert [i for b in batches for i in b] == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 and len(b) <= 3 for b in batches)
    assert batches == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert pack([1] * 7, capacity=100, max_seqs=3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert pack([], 8, 3) == []
    with pytest.raises(ValueError, match="more than a batch holds"):
        pack([3, 9], capacity=8, max_seqs=3)


def test_mean_pool_averages_each_span_and_checks_the_row_count() -> None:
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    pooled = mean_pool(rows, [2, 0, 1, 3])
    np.testing.assert_allclose(pooled, [[1, 2], [0, 0], [4, 5], [8, 9]])
    with pytest.raises(ValueError, match="rows"):
        mean_pool(rows, [2, 2])


# -- the cache ----------------------------------------------------------------------------------------


def test_the_pass_stops_when_the_rest_would_take_more_than_its_share_of_the_time_left(tmp_path: Path) -> None:
    """Each chunk costs 100 s of a fake clock; with 1,000 s left the first chunk's rate projects
    100 s for the second chunk, within EMBED_SHARE; with 300 s left it is over, and the pass stops
    with the first chunk cached."""
    from extractor import embeddings

    now = [0.0]

    def slow(texts):
        now[0] += 100.0
        return np.ones((len(texts), 2), dtype=np.float32)

    texts = [f"verslag {i}" for i in range(2 * embeddings.CACHE_CHUNK)]
    roomy = CachedEmbedder(slow, None, lambda: 1000.0, clock=lambda: now[0])
    assert roomy(texts).shape == (len(texts), 2)
    path = cache_path(tmp_path, model_key("tight"))
    tight = CachedEmbedder(slow, path, lambda: 300.0, clock=lambda: now[0])
    with pytest.raises(TimeoutError, match="more than 25% of the 300 s left"):
        tight(texts)
    assert CachedEmbedder(None, path).missing(texts) == embeddings.CACHE_CHUNK  # the first chunk is kept


class CountingEmbedder:
    """A fake embedder: the text's length and vowel count, remembering every text it was asked."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.seen += texts
        return np.array([[len(t), sum(ch in "aeiou" for ch in t)] for t in texts], dtype=np.float32)


def test_cached_vectors_are_reused_in_memory_and_from_disk(tmp_path: Path) -> None:
    path = cache_path(tmp_path, model_key("abc"))
    fake = CountingEmbedder()
    cache = CachedEmbedder(fake, path)
    first = cache(["een lever", "twee nieren", "een lever"])
    assert fake.seen == ["een lever", "twee nieren"]  # a repeated text is embedded once
    np.testing.assert_array_equal(first[0], first[2])
    cache(["twee nieren", "drie"])
    assert fake.seen[-1:] == ["drie"] and cache.hits == 1 and cache.misses == 3
    # A rerun: a new cache on the same file answers without any embedder (the model stays closed).
    again = CachedEmbedder(None, path)
    assert again.missing(["een lever", "drie", "vier"]) == 1
    np.testing.assert_array_equal(again(["een lever", "twee nieren", "een lever"]), first)
    with pytest.raises(RuntimeError, match="not in the embedding cache"):
        again(["vier"])
    # Another model file: another key, another file, nothing reused.
    assert cache_path(tmp_path, model_key("abd")) != path
    assert CachedEmbedder(None, cache_path(tmp_path, model_key("abd"))).missing(["een lever"]) == 1


def test_keys_ending_in_a_nul_byte_survive_the_file(tmp_path: Path) -> None:
    text = next(f"tekst {i}" for i in range(10_000) if text_key(f"tekst {i}").endswith(b"\x00"))
    path = tmp_path / "embeddings-x.npz"
    CachedEmbedder(CountingEmbedder(), path)([text, "ander"])
    assert CachedEmbedder(None, path).missing([text, "ander"]) == 0


def test_an_unreadable_cache_is_embedded_again_with_a_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "embeddings-x.npz"
    path.write_bytes(b"not an npz file")
    fake = CountingEmbedder()
    with caplog.at_level(logging.WARNING):
        vectors = CachedEmbedder(fake, path)(["a", "bb"])
    assert "unreadable" in caplog.text and fake.seen == ["a", "bb"] and vectors.shape == (2, 2)
    assert CachedEmbedder(None, path).missing(["a", "bb"]) == 0  # rewritten whole


def test_the_flag_auto_is_on_only_with_gpu_offload() -> None:
    from extractor.llama_api import supports_gpu_offload

    assert embedding_head_wanted("on", "off") and not embedding_head_wanted("off", "on")
    assert not embedding_head_wanted("auto", "off")
    assert embedding_head_wanted("auto", "auto") == supports_gpu_offload()


# -- on the default model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder():
    from extractor.llama_api import Model

    model = Model(DEFAULT_MODEL)
    emb = Embedder(model, n_threads=2, on_gpu=False, max_tokens=64, batch_tokens=64)
    yield emb
    emb.close()
    model.close()


@needs_model
def test_vectors_do_not_depend_on_the_batch_and_long_texts_are_cut(embedder: Embedder) -> None:
    texts = ["Lever zonder afwijkingen.", "Nier links 4,5 cm, cyste.", "", "Long: " + "nodus " * 200]
    together = embedder(texts)
    assert together.shape == (4, embedder.model.n_embd()) and together.dtype == np.float32
    assert embedder.stats.truncated == 1 and embedder.stats.decodes == 2  # 64-token batches: the cut text fills one
    alone = np.stack([embedder([t])[0] for t in texts])
    np.testing.assert_allclose(alone, together, rtol=1e-3, atol=1e-3)
    assert np.linalg.norm(together[0]) > 0 and not np.allclose(together[0], together[1], atol=1e-2)
    if not embedder.model.add_bos:
        assert not together[2].any()  # no tokens at all: a zero vector, nothing decoded


@needs_model
def test_engine_embed_gives_one_vector_per_text() -> None:
    from extractor.engine import Engine, EngineOptions

    engine = Engine(DEFAULT_MODEL, EngineOptions(n_ctx=512, n_threads=2), n_seq=1)
    try:
        vectors = engine.embed(["Geen vrij vocht.", "Status na cholecystectomie."])
    finally:
        engine.close()
    assert vectors.shape == (2, engine.model.n_embd() if engine.model.ptr else 576)
    assert np.isfinite(vectors).all()


@needs_model
def test_a_job_trains_the_embedding_head_as_a_candidate_and_a_rerun_uses_the_cache(tmp_path: Path, caplog) -> None:
    job = write_jobs(tmp_path / "jobs", sizes=(30, 12, 8))["Task101_Example_sl_bin_clf"]
    work, summary = tmp_path / "work", tmp_path / "s.json"
    args = ["--input", str(job), "--output", str(tmp_path / "o"), "--validation-cases", "0", "--work-dir", str(work)]
    args += ["--embedding-head", "on", "--threads", "2", "--summary", str(summary)]
    with caplog.at_level(logging.INFO):
        assert process.main(args) == 0
    assert re.search(r"embedding pass: \d+ reports, \d+ tokens in", caplog.text)  # distinct texts embedded
    scores = orjson.loads(summary.read_bytes())["choice"]["base"]["scores"]
    assert scores["embedding-linear"] is not None and scores["embedding-linear"] > 0.5  # AUC above chance
    assert len(list(work.glob("embeddings-*.npz"))) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert process.main(args) == 0
    assert "all 50 reports cached" in caplog.text and not re.search(r"embedding pass: \d+ reports", caplog.text)
    assert orjson.loads(summary.read_bytes())["choice"]["base"]["scores"] == scores


def test_heads_only_runs_never_touch_the_model(tmp_path: Path) -> None:
    """`--validation-cases 0 --embedding-head off`: a model file that is not a model is never read."""
    job = write_jobs(tmp_path / "jobs", sizes=(30, 12, 8))["Task101_Example_sl_bin_clf"]
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"no model here")
    args = ["--input", str(job), "--output", str(tmp_path / "o"), "--validation-cases", "0", "--model", str(bad)]
    assert process.main([*args, "--embedding-head", "off", "--work-dir", str(tmp_path / "w")]) == 0
    assert (tmp_path / "o" / "nlp-predictions-dataset.json").is_file()
