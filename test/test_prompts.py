from __future__ import annotations

from extractor.backend import PlainTokenizer
from extractor.dragon_io import Case
from extractor.prompts import PromptBuilder, render_case, system_prompt
from extractor.taskfiles import Taskfile


def tf_for(kind: str = "text", **over) -> Taskfile:
    base = dict(
        task_names=["T"],
        label_name="single_label_binary_classification_target",
        instructions="Is there a lesion?",
        fields=[{"name": "lesion", "type": "boolean", "description": "any lesion"}],
        input={"kind": kind, "part_names": ["Premise", "Hypothesis"]},
        reasoning={"enabled": True, "max_chars": 100},
    )
    base.update(over)
    return Taskfile.model_validate(base)


def builder(tf: Taskfile, limit: int = 100_000, side: str = "left") -> PromptBuilder:
    return PromptBuilder(tf, PlainTokenizer(), truncation_side=side, context_limit=limit)


def test_everything_before_the_report_is_shared() -> None:
    b = builder(tf_for())
    p1 = b.build(Case("a", text="first report"), reasoning=True, max_tokens=50).request.prompt
    p2 = b.build(Case("b", text="second one"), reasoning=True, max_tokens=50).request.prompt
    shared = len(p1) - len("first report") - len("\n<assistant>\n")
    assert p1[:shared] == p2[:shared]
    assert "Is there a lesion?" in p1[:shared] and '"reasoning"' in p1[:shared]


def test_system_prompt_lists_fields_in_order() -> None:
    text = system_prompt(tf_for(), reasoning=False)
    assert '"lesion": true or false. any lesion' in text and '"reasoning"' not in text


def test_parts_and_words_render() -> None:
    assert render_case(["p", "h"], None, tf_for("sentence_pair")) == "Premise: p\nHypothesis: h"
    ner = Taskfile.model_validate(
        dict(
            task_names=["T"],
            label_name="named_entity_recognition_target",
            instructions="x",
            input={"kind": "words"},
            fields=[{"name": "entities", "type": "entities"}],
            ner={"entity_types": ["X"]},
        )
    )
    assert render_case(["a", "b"], None, ner, first_word=3) == "[3]a [4]b"


def test_long_report_is_cut_on_the_configured_side() -> None:
    text = "START " + "x " * 500 + "END"
    for side, kept, lost in (("left", "END", "START"), ("right", "START", "END")):
        plan = builder(tf_for(), limit=800, side=side).build(Case("a", text=text), reasoning=True, max_tokens=50)
        assert plan.truncated
        assert kept in plan.request.prompt and lost not in plan.request.prompt
        assert plan.request.prompt_tokens + 50 <= 800


def test_long_ner_report_keeps_whole_numbered_words() -> None:
    ner = Taskfile.model_validate(
        dict(
            task_names=["T"],
            label_name="named_entity_recognition_target",
            instructions="x",
            input={"kind": "words"},
            fields=[{"name": "entities", "type": "entities"}],
            ner={"entity_types": ["X"]},
        )
    )
    words = tuple(f"w{i}" for i in range(300))
    plan = builder(ner, limit=1500, side="left").build(Case("a", parts=words), reasoning=False, max_tokens=100)
    assert plan.truncated and "[299]w299" in plan.request.prompt and "[0]w0 " not in plan.request.prompt
