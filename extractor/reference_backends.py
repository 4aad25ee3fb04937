"""Backends that need no model: the perfect-answer oracle and the answer-nothing prior.

The oracle answers from the ground truth in the Taskfile's own output format, so a run with it
tests everything between prompts and the predictions file: a perfect model must score 1.000.
The prior backend answers nothing, so every case falls back to the training prior (the floor).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from extractor.backend import ModelFree, Request, Result
from extractor.dragon_io import Case, JobError
from extractor.gold import label_to_answer
from extractor.schema import REASONING_FIELD
from extractor.taskfiles import Taskfile


def load_ground_truth(path: Path, label_name: str) -> dict[str, Any]:
    """uid -> label from a dragon-eval ground-truth file."""
    try:
        records = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as err:
        raise JobError(f"{path}: cannot read ground truth: {err}") from None
    truth = {}
    for i, rec in enumerate(records):
        if label_name not in rec:
            raise JobError(f"{path}: record {i}: field {label_name!r} missing")
        truth[str(rec["uid"])] = rec[label_name]
    return truth


class OracleBackend(ModelFree):
    """Answers every request with the ground truth, as a perfect model would write it."""

    name = "oracle"

    def __init__(self, truth: Mapping[str, Any], cases: Sequence[Case], tf: Taskfile) -> None:
        self.truth = truth
        self.words = {c.uid: c.parts for c in cases}
        self.tf = tf

    def generate(self, requests: Sequence[Request]) -> Iterator[Result]:
        for req in requests:
            if req.uid not in self.truth:
                yield Result(uid=req.uid, text="", error="oracle: no ground truth for this uid")
                continue
            answer = label_to_answer(self.truth[req.uid], self.words.get(req.uid), self.tf)
            if REASONING_FIELD in req.schema.get("properties", {}):
                answer = {REASONING_FIELD: "taken from the ground truth", **answer}
            yield Result(
                uid=req.uid,
                text=orjson.dumps(answer).decode(),
                prompt_tokens=req.prompt_tokens,
            )


class PriorBackend(ModelFree):
    """Gives no answer, so the pipeline's fallback (the training prior) answers every case."""

    name = "prior"

    def generate(self, requests: Sequence[Request]) -> Iterator[Result]:
        for req in requests:
            yield Result(uid=req.uid, text="", error="prior backend: no model answer")
