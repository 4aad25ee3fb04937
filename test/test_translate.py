from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from extractor.backend import PlainTokenizer, Request, Result
from extractor.dragon_io import Case
from extractor.taskfiles import Taskfile
from extractor.translate import translate_cases


def tf(label_name: str = "single_label_binary_classification_target", kind: str = "text") -> Taskfile:
    fields = [{"name": "e", "type": "entities"}] if "named" in label_name else [{"name": "a", "type": "boolean"}]
    extra = {"ner": {"entity_types": ["X"]}} if "named" in label_name else {}
    return Taskfile.model_validate(
        dict(task_names=["T"], label_name=label_name, instructions="x", input={"kind": kind}, fields=fields, **extra)
    )


class Upper:
    """Translates by upper-casing; fails on pieces containing 'fail'."""

    name = "upper"

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def generate(self, requests: Sequence[Request]) -> Iterator[Result]:
        for req in requests:
            self.requests.append(req)
            piece = req.messages[-1].content
            yield (
                Result(uid=req.uid, text="", error="x") if "fail" in piece else Result(uid=req.uid, text=piece.upper())
            )


def test_reports_are_replaced_by_their_translation() -> None:
    backend = Upper()
    cases = [Case("a", text="de lever"), Case("b", text="fail here"), Case("c", text="  ")]
    out, failed = translate_cases(cases, tf(), backend, PlainTokenizer(), 10_000)
    assert [c.text for c in out] == ["DE LEVER", "fail here", "  "] and failed == 1
    assert all(r.schema == {} for r in backend.requests) and len(backend.requests) == 2


def test_block_numeral_is_kept_and_report_translated() -> None:
    cases = [Case("a", parts=("II", "poliep"))]
    out, _ = translate_cases(cases, tf(kind="block_report"), Upper(), PlainTokenizer(), 10_000)
    assert out[0].parts == ("II", "POLIEP")


def test_ner_is_refused() -> None:
    with pytest.raises(ValueError, match="NER"):
        translate_cases([], tf("named_entity_recognition_target", "words"), Upper(), PlainTokenizer(), 10_000)
