"""The teacher's prompt: the user's question with the feedback, through the model's chat template.

The teacher is the frozen base model that reads the feedback the student never saw; its next-token
distributions over the same response are what the student is distilled towards.
"""

from __future__ import annotations

from typing import Any

from lorafleet_trainer.samples import DistillSample

FEEDBACK_HEADER = "Feedback on an earlier answer to this request:"


def teacher_messages(sample: DistillSample) -> list[dict[str, str]]:
    messages = []
    if sample.system_prompt:
        messages.append({"role": "system", "content": sample.system_prompt})
    content = f"{sample.user_prompt}\n\n{FEEDBACK_HEADER}\n{sample.feedback}"
    messages.append({"role": "user", "content": content})
    return messages


def teacher_prompt_ids(tokenizer: Any, sample: DistillSample) -> list[int]:
    """Token ids of the teacher prompt, ending where the assistant's response begins."""
    encoded = tokenizer.apply_chat_template(
        teacher_messages(sample), add_generation_prompt=True, tokenize=True
    )
    # transformers 5 returns a BatchEncoding here; older versions a plain list.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]
