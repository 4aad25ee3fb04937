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
