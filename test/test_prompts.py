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


def test_entity_types_are_rendered_from_the_jobs_tags() -> None:
    ner = Taskfile.model_validate(
        dict(
            task_names=["T"],
            label_name="named_entity_recognition_target",
            instructions="x",
            input={"kind": "words"},
            fields=[{"name": "entities", "type": "entities"}],
            ner={
                "entity_types": ["<ID-X>", "<ID_X>", "<NEW>"],
                "type_descriptions": {"<ID_X>": "an identifier", "<GONE>": "never in this job"},
                "type_aliases": {"<ID-X>": "<ID_X>"},
            },
        )
    )
    text = system_prompt(ner, reasoning=False)
    assert "- <ID-X> or <ID_X> (the training data spell this type" in text and ": an identifier" in text
    assert "- <NEW>\n" in text
    assert "<GONE>" not in text and "never in this job" not in text


def test_label_meanings_are_rendered_for_the_fields_labels_only() -> None:
    tf = tf_for(
        label_name="single_label_multi_class_classification_target",
        fields=[
            {
                "name": "organ",
                "type": "label",
                "labels": ["lung", "other"],
                "label_descriptions": {"lung": "'long'", "pleura": "'pleura'", "other": "anything else"},
            }
        ],
    )
    text = system_prompt(tf, reasoning=False)
    assert "  - \"lung\": 'long'" in text and '  - "other": anything else' in text
    assert "pleura" not in text


REG_TEXT = "Klinische gegevens: PSA 9,7 ng/ml. " + "Verslag zonder bevindingen. " * 60 + "Prostaatvolume 68 cc."


def reg_tf(**examples) -> Taskfile:
    return tf_for(
        label_name="single_label_regression_target",
        fields=[{"name": "volume", "type": "number", "nullable": True}],
        examples={"max_chars": 200, **examples},
    )


def test_answer_window_keeps_the_written_value_of_a_right_truncated_example() -> None:
    from extractor.prompts import render_example

    case = Case("e", text=REG_TEXT, label=68.0)
    side_text, _ = render_example(case, reg_tf(), "right")
    assert "68" not in side_text and side_text.startswith("Klinische")
    window_text, answer = render_example(case, reg_tf(window="answer"), "right")
    assert "Prostaatvolume 68 cc" in window_text and len(window_text) == 200 and answer == '{"volume":68.0}'


def test_answer_window_falls_back_to_the_anchor_words_for_a_computed_value() -> None:
    from extractor.prompts import render_example

    case = Case("e", text=REG_TEXT, label=0.1426)  # 9.7 / 68: written nowhere
    text, _ = render_example(case, reg_tf(window="answer", anchors=["volume"]), "right")
    assert "volume 68 cc" in text


def test_number_forms_match_dutch_and_english_decimals_but_not_longer_numbers() -> None:
    from extractor.prompts import answer_evidence

    tf = reg_tf(window="answer")
    assert answer_evidence("PSA 0,20 en 10,2 en 0.2", 0.2, tf) == [(4, 8), (20, 23)]
    assert answer_evidence("volume 168 cc", 68.0, tf) == []


def test_answer_window_of_numbered_words_keeps_the_entities() -> None:
    from extractor.prompts import render_example

    ner = Taskfile.model_validate(
        dict(
            task_names=["T"],
            label_name="named_entity_recognition_target",
            instructions="x",
            input={"kind": "words"},
            fields=[{"name": "entities", "type": "entities"}],
            ner={"entity_types": ["X"]},
            examples={"max_chars": 120, "window": "answer"},
        )
    )
    words = tuple(f"w{i}" for i in range(100))
    label = ["O"] * 100
    label[80], label[81], label[90] = "B-X", "I-X", "B-X"
    case = Case("e", parts=words, label=label)
    text, answer = render_example(case, ner, "right")
    assert "[80]w80" in text and "[90]w90" in text and len(text) <= 120
    assert answer.count('"type"') == 2
    side = ner.model_copy(update={"examples": ner.examples.model_copy(update={"window": "side"})})
    side_text, side_answer = render_example(case, side, "right")
    assert "[0]w0" in side_text and side_answer == '{"entities":[]}'
