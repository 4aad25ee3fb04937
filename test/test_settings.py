from __future__ import annotations

from pathlib import Path

import pytest

from extractor.settings import ModelNotFound, find_model, parse_settings


def test_model_lookup_order(tmp_path: Path) -> None:
    platform, bundled = tmp_path / "platform", tmp_path / "bundled"
    platform.mkdir()
    bundled.mkdir()
    (bundled / "small.gguf").write_bytes(b"x")
    assert find_model(None, (platform, bundled)) == bundled / "small.gguf"
    (platform / "big.gguf").write_bytes(b"x")
    assert find_model(None, (platform, bundled)) == platform / "big.gguf"
    explicit = tmp_path / "mine.gguf"
    explicit.write_bytes(b"x")
    assert find_model(explicit, (platform, bundled)) == explicit


def test_no_model_names_every_place(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as info:
        find_model(None, (tmp_path / "a", tmp_path / "b"))
    assert str(tmp_path / "a") in str(info.value) and str(tmp_path / "b") in str(info.value)


def test_several_models_are_listed(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="a.gguf, b.gguf"):
        find_model(None, (tmp_path,))


def test_split_model_loads_from_its_first_part(tmp_path: Path) -> None:
    for i in (1, 2, 3):
        (tmp_path / f"qwen-{i:05d}-of-00003.gguf").write_bytes(b"x")
    assert find_model(None, (tmp_path,)).name == "qwen-00001-of-00003.gguf"


def test_flags_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRAGON_INPUT", "/from/env")
    monkeypatch.setenv("DRAGON_MAX_CASES", "3")
    s = parse_settings([])
    assert s.input == Path("/from/env") and s.max_cases == 3
    assert parse_settings(["--input", "/flag"]).input == Path("/flag")


def test_defaults_are_the_platform_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DRAGON_INPUT", "DRAGON_OUTPUT"):
        monkeypatch.delenv(var, raising=False)
    s = parse_settings([])
    assert s.input == Path("/input") and s.output == Path("/output")


def test_readme_documents_every_flag() -> None:
    from conftest import REPO

    from extractor.settings import build_parser

    readme = (REPO / "README.md").read_text()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}" in readme, f"{flag} is not in the README's configuration table"


def test_parallel_sequences_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRAGON_PARALLEL", raising=False)
    assert parse_settings([]).parallel == 0  # automatic: the batched engine picks N
    assert parse_settings(["--parallel", "1"]).parallel == 1
    monkeypatch.setenv("DRAGON_PARALLEL", "4")
    assert parse_settings([]).parallel == 4
    with pytest.raises(SystemExit, match="--parallel"):
        parse_settings(["--parallel", "-2"])


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_vote_k_must_be_positive(value: str) -> None:
    """--vote-k 0 used to become 8 silently; a vote of no neighbours is not a setting."""
    with pytest.raises(SystemExit, match="--vote-k"):
        parse_settings(["--vote-k", value])
    assert parse_settings(["--vote-k", "3"]).vote_k == 3
