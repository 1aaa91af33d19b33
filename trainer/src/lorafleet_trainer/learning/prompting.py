"""How the teacher reads the feedback: named templates over the user's question and the feedback.

The teacher is the frozen base model prompted with the feedback the student never saw; its
next-token distributions over the same response are what the student is distilled towards, so the
template decides whether the feedback reaches the teacher at all. A small model follows an
instruction far better than a remark about an earlier answer: on ``builtin:smollm2`` the teacher's
probability of a pirate opening was 0.047 with the feedback appended under a header ("appended"),
0.21 with it as an instruction before the question ("instruction"). ``make eval`` chose the default
(``teacherTemplate`` in the CRD; README, "Learning").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lorafleet_trainer.learning import sampling
from lorafleet_trainer.learning.samples import DistillSample

APPENDED_HEADER = "Feedback on an earlier answer to this request:"
PLACEHOLDERS = ("feedback", "question", "system_prompt", "response", "demonstration")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


@dataclass(frozen=True)
class TeacherInput:
    """What a template may show the teacher: the question, the feedback, and around them."""

    question: str
    feedback: str
    system_prompt: str = ""
    response: str = ""  # the answer the feedback was given on (the rollout)
    demonstration: str = ""  # an example of a good answer, when the client has one

    @classmethod
    def of(cls, sample: DistillSample) -> TeacherInput:
        return cls(
            sample.user_prompt, sample.feedback, sample.system_prompt, sample.response, sample.demonstration
        )


def _with_example(text: str, demonstration: str) -> str:
    return f"{text}\nFor example: {demonstration}" if demonstration else text


def _custom(template: str, given: TeacherInput) -> str:
    # One pass over the template: a value that itself holds "{question}" is not substituted again.
    return _PLACEHOLDER.sub(lambda m: str(getattr(given, m.group(1))), template)


def teacher_messages(given: TeacherInput, template: str, custom: str = "") -> list[dict[str, str]]:
    """The teacher's chat messages for one of the named templates (``TRAINING["teacher_template"]``)."""
    system, user = given.system_prompt, given.question
    if template == "instruction":
        user = f"{_with_example(given.feedback, given.demonstration)}\n\n{given.question}"
    elif template == "system":
        instruction = _with_example(given.feedback, given.demonstration)
        system = f"{system}\n\n{instruction}" if system else instruction
    elif template == "hindsight":
        earlier = f"An earlier answer to this question was:\n{given.response}\n\n" if given.response else ""
        user = (
            f"{given.question}\n\n{earlier}Feedback: {_with_example(given.feedback, given.demonstration)}\n\n"
            "Answer the question again, following the feedback."
        )
    elif template == "appended":
        user = f"{given.question}\n\n{APPENDED_HEADER}\n{given.feedback}"
    elif template == "custom":
        user = _custom(custom, given)
        if "{system_prompt}" in custom:
            system = ""  # the template placed it itself
    else:  # the field contract refuses other names before a step gets here
        raise ValueError(f"unknown teacher template {template!r}")
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return messages


def teacher_prompt_ids(tokenizer: Any, given: TeacherInput, template: str, custom: str = "") -> list[int]:
    """Token ids of the teacher prompt, ending where the assistant's response begins."""
    return sampling.chat_ids(tokenizer, teacher_messages(given, template, custom))
