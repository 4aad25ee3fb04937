"""The pipeline's pure helpers (the stages themselves run in test_process and test_choice)."""

from __future__ import annotations

import pytest

from extractor.pipeline import apply_settings
from extractor.settings import parse_settings
from extractor.taskfiles import Taskfile


def taskfile(reasoning: dict) -> Taskfile:
    return Taskfile.model_validate(
        {
            "task_names": ["T"],
            "label_name": "single_label_binary_classification_target",
            "instructions": "x",
            "fields": [{"name": "present", "type": "boolean"}],
            "reasoning": reasoning,
        }
    )


@pytest.mark.parametrize("flag", ["on", "off"])
def test_the_reasoning_flag_switches_reasoning_and_keeps_the_rest_of_its_settings(flag: str) -> None:
    """`--reasoning on` once rebuilt the reasoning settings from two fields and silently dropped
    `scores: without_reasoning` (found by issue 16's item-9 run: both ways scored the same)."""
    tf = taskfile({"enabled": flag == "off", "max_chars": 123, "scores": "without_reasoning"})
    out = apply_settings(tf, parse_settings(["--reasoning", flag]))
    assert out.reasoning.enabled is (flag == "on")
    assert out.reasoning.max_chars == 123 and out.reasoning.scores == "without_reasoning"


def test_auto_reasoning_keeps_the_taskfile_as_it_is() -> None:
    tf = taskfile({"enabled": True, "max_chars": 50})
    assert apply_settings(tf, parse_settings([])) is tf


def test_reasoning_switched_on_by_the_flag_gets_room_in_the_output_budget() -> None:
    """A Taskfile without reasoning sizes its budget for the answer alone (64 tokens for Task101):
    `--reasoning on` adds max_chars / 3 tokens, and `--max-output-tokens` still caps the total."""
    tf = taskfile({"enabled": False, "max_chars": 300}).model_copy(update={"max_output_tokens": 64})
    assert apply_settings(tf, parse_settings(["--reasoning", "on"])).max_output_tokens == 164
    capped = apply_settings(tf, parse_settings(["--reasoning", "on", "--max-output-tokens", "100"]))
    assert capped.max_output_tokens == 100
    assert apply_settings(tf, parse_settings(["--reasoning", "off"])).max_output_tokens == 64
    planned = taskfile({"enabled": True, "max_chars": 300}).model_copy(update={"max_output_tokens": 200})
    assert apply_settings(planned, parse_settings(["--reasoning", "on"])).max_output_tokens == 200
