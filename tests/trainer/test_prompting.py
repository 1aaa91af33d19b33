"""The teacher's templates: where the feedback goes, and what a custom template may place."""

from __future__ import annotations

import pytest

from lorafleet_api.fields import TRAINING
from lorafleet_trainer.learning import prompting
from lorafleet_trainer.learning.prompting import TeacherInput

GIVEN = TeacherInput(
    question="What is the largest ocean?",
    feedback="Answer in French.",
    system_prompt="Be brief.",
    response="The Pacific Ocean.",
    demonstration="L'océan Pacifique.",
)


def test_every_named_template_is_one_the_crd_offers() -> None:
    for name in TRAINING["teacher_template"].schema["enum"]:
        custom = "{feedback} {question}" if name == "custom" else ""
        messages = prompting.teacher_messages(GIVEN, name, custom)
        text = " ".join(m["content"] for m in messages)
        assert "Answer in French." in text, name
        assert messages[-1]["role"] == "user"


def test_instruction_puts_the_feedback_before_the_question() -> None:
    messages = prompting.teacher_messages(GIVEN, "instruction")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    user = messages[1]["content"]
    assert user.index("Answer in French.") < user.index("What is the largest ocean?")
    assert "For example: L'océan Pacifique." in user  # the demonstration, when there is one


def test_system_puts_the_feedback_in_the_system_prompt() -> None:
    messages = prompting.teacher_messages(GIVEN, "system")
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("Be brief.") and "Answer in French." in messages[0]["content"]
    assert messages[1] == {"role": "user", "content": "What is the largest ocean?"}
    bare = prompting.teacher_messages(TeacherInput("Q?", "Answer in French."), "system")
    assert bare[0]["content"] == "Answer in French."


def test_hindsight_shows_the_earlier_answer_and_asks_again() -> None:
    user = prompting.teacher_messages(GIVEN, "hindsight")[-1]["content"]
    order = [user.index(s) for s in ("What is the largest ocean?", "The Pacific Ocean.", "Answer in French.")]
    assert order == sorted(order)
    assert "again" in user


def test_appended_is_the_header_form() -> None:
    user = prompting.teacher_messages(GIVEN, "appended")[-1]["content"]
    assert user == f"What is the largest ocean?\n\n{prompting.APPENDED_HEADER}\nAnswer in French."


def test_custom_fills_each_placeholder_once() -> None:
    template = "[{system_prompt}] {feedback} | {question} | was: {response} | like: {demonstration} | {other}"
    messages = prompting.teacher_messages(GIVEN, "custom", template)
    # The template placed the system prompt itself, so no system message is added.
    assert messages == [
        {
            "role": "user",
            "content": "[Be brief.] Answer in French. | What is the largest ocean? | was: The Pacific Ocean."
            " | like: L'océan Pacifique. | {other}",
        }
    ]
    # A value holding a placeholder is not substituted again.
    tricky = TeacherInput(question="say {feedback}", feedback="F")
    assert prompting.teacher_messages(tricky, "custom", "{question}")[-1]["content"] == "say {feedback}"


def test_an_unknown_template_is_refused() -> None:
    with pytest.raises(ValueError, match="polite"):
        prompting.teacher_messages(GIVEN, "polite")
