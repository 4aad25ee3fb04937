from __future__ import annotations

from pathlib import Path

from extractor.generation import CaseAnswer
from extractor.journal import Journal, journal_key


def test_answers_survive_and_a_torn_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j = Journal(path)
    j.append(CaseAnswer(uid="a", answer={"x": 1.0}, likelihoods={"x": {"true": -0.1}}, attempts=1))
    j.append(CaseAnswer(uid="b", error="failed", attempts=3))
    j.close()
    with open(path, "ab") as fh:
        fh.write(b'{"uid": "c", "answ')
    loaded = Journal(path).load()
    assert set(loaded) == {"a", "b"}
    assert loaded["a"].ok and loaded["a"].likelihoods == {"x": {"true": -0.1}}
    assert not loaded["b"].ok and loaded["b"].attempts == 3


def test_key_changes_with_what_decides_the_answers(tmp_path: Path) -> None:
    f = tmp_path / "input.json"
    f.write_text("[1]")
    base = journal_key("llama", "sha-model", "sha-taskfile", files=[f])
    assert base == journal_key("llama", "sha-model", "sha-taskfile", files=[f])
    assert base != journal_key("llama", "other-model", "sha-taskfile", files=[f])
    assert base != journal_key("llama", "sha-model", "other-taskfile", files=[f])
    f.write_text("[2]")
    assert base != journal_key("llama", "sha-model", "sha-taskfile", files=[f])
