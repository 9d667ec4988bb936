"""Where the context goes: the student's and the teacher's conversations, as token ids.

The student's prompt is the conversation without the context c. The teacher's prompt is
the same conversation with c: in the system message (system prompts), or joined into the
user turn through a template (experience, hints, per-example privileged fields). Chat
templates come from the tokenizer. The context is inserted as plain text in one pass:
nothing in it is interpreted as a template. :func:`insert_context` does the insertion for any
conversation (training's one-turn prompts, ``opcd chat``'s multi-turn histories).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from opcd.errors import DataError
from opcd.tasks.base import Example, Task

_PLACEHOLDER = re.compile(r"\{(context|prompt)\}")


def fill_template(template: str, context: str, prompt: str) -> str:
    """Replace ``{context}`` and ``{prompt}`` in one pass (no format-spec evaluation)."""
    values = {"context": context, "prompt": prompt}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def student_messages(example: Example) -> list[dict[str, str]]:
    user = {"role": "user", "content": example.prompt}
    return [{"role": "system", "content": example.system}, user] if example.system else [user]


def insert_context(
    messages: list[dict[str, str]],
    context: str | None,
    placement: str = "system",
    user_template: str = "{context}\n\n{prompt}",
) -> list[dict[str, str]]:
    """``messages`` with ``context`` added (a new list; no context: the messages unchanged).

    ``system``: the context as the system message; where the conversation has a system
    message of its own, the context goes in front of it in that one message (chat
    templates differ on a second system message; some refuse it). ``user``: the first user
    turn becomes ``user_template`` filled with the context and that turn's text.
    """
    if not context:
        return list(messages)
    if placement == "system":
        if messages and messages[0]["role"] == "system":
            merged = {"role": "system", "content": f"{context}\n\n{messages[0]['content']}"}
            return [merged, *messages[1:]]
        return [{"role": "system", "content": context}, *messages]
    out = list(messages)
    for i, m in enumerate(out):
        if m["role"] == "user":
            out[i] = {"role": "user", "content": fill_template(user_template, context, m["content"])}
            return out
    raise ValueError("placement 'user' needs a user turn to put the context into")


def task_context(task: Task) -> str | None:
    """The task-wide context: what an example without a context of its own gets (None: none)."""
    return task.context(Example(id="", prompt=""))


def teacher_messages(task: Task, example: Example) -> list[dict[str, str]]:
    return insert_context(student_messages(example), task.context(example), task.placement,
                          task.user_template)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, ready to generate."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"The tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat "
            "template. Use an instruction-tuned (chat) model."
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class PromptPair:
    """One example's student prompt (no context) and teacher prompt (with context)."""

    example: Example
    student_ids: list[int]
    teacher_ids: list[int]
    truncated: bool = False


def build_prompt_pair(
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    example: Example,
    *,
    max_prompt_tokens: int,
    truncate: bool = False,
    with_context: bool = True,
) -> PromptPair:
    """Encode both prompts; refuse (or left-truncate, when configured) over-long ones.
    ``with_context=False``: the teacher's prompt is the student's (a row on which the
    teacher stands for the model without the context)."""
    s_ids = encode_chat(tokenizer, student_messages(example))
    t_ids = encode_chat(tokenizer, teacher_messages(task, example)) if with_context else list(s_ids)
    truncated = False
    for name, ids in (("student", s_ids), ("teacher", t_ids)):
        if len(ids) > max_prompt_tokens:
            if not truncate:
                raise DataError(
                    f"Example {example.id!r}: the {name} prompt is {len(ids)} tokens, over "
                    f"rollout.max_prompt_tokens={max_prompt_tokens}. Raise the limit (within the "
                    "model's context length), shorten the context, or set "
                    "rollout.truncate_prompts=true to keep the last tokens."
                )
            del ids[: len(ids) - max_prompt_tokens]
            truncated = True
    return PromptPair(example, s_ids, t_ids, truncated)
