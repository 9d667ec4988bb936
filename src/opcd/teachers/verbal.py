"""The verbal teacher: a model that reads the student's text and writes (a verdict, an answer).

OVD (:mod:`opcd.methods.ovd`, :mod:`opcd.methods.ovd_method`) needs of its teacher only text in
and text out, plus, for ``ovd.score_mode=expected``, the log-probabilities of the digits 0-9 as
the first token of its answer. :class:`VerbalTeacher` is that interface (a black box behind an
API implements ``generate`` alone); :class:`ModelVerbalTeacher` is a local causal LM with its
own tokenizer and chat template, whose weights ``teacher.mode`` picks through the same
:class:`~opcd.teachers.teacher.TeacherWeights` as the log-prob teacher of OPCD.

Where it sits: built by ``ovd_method.verbal_teacher`` at the start of a run; called by the
OVD scorer each step (ratings, then replacements of poor responses).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from opcd.errors import ModelError
from opcd.teachers.teacher import TeacherWeights

DIGITS = tuple(str(d) for d in range(10))
"""The verdicts a verbal teacher may give: "0" ... "9"."""


@dataclass
class Generation:
    """A teacher's answer: its text and whether it ended on its own (not cut at the limit)."""

    text: str
    ended: bool


Conversation = list[dict[str, str]]


def digit_token_ids(tokenizer: object, name: str = "the teacher") -> list[int]:
    """Token ids of "0" ... "9" in ``tokenizer``; ModelError if a digit is not one token."""
    ids = []
    for d in DIGITS:
        enc = tokenizer(d, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if len(enc) != 1:
            raise ModelError(
                f"The tokenizer of {name} writes the digit {d} as {len(enc)} tokens, so the "
                "expected score cannot be read from one next-token distribution. Use "
                "ovd.score_mode=generate."
            )
        ids.append(int(enc[0]))
    return ids


class VerbalTeacher(ABC):
    """What OVD needs of a teacher: text in, text out (and, optionally, digit log-probs).

    ``generate`` answers chat conversations; a ``prefill`` is text the assistant's answer
    must start with (used by ``suffix`` replacement), which the returned text does not
    repeat. ``None`` in the result: this conversation could not be answered (too long).
    A black-box teacher implements ``generate`` alone and is used with
    ``ovd.score_mode=generate``.
    """

    name: str = "teacher"

    @abstractmethod
    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int,
        temperature: float,
        prefills: Sequence[str] | None = None,
    ) -> list[Generation | None]:
        """One answer per conversation (``temperature`` 0: greedy)."""

    def digit_logprobs(self, conversations: Sequence[Conversation]) -> list[Tensor | None]:
        """Per conversation, the log-probabilities ``[10]`` of the digits 0-9 as the first
        token of the answer (``None``: too long)."""
        raise NotImplementedError(
            f"{type(self).__name__} gives no next-token probabilities; use ovd.score_mode=generate."
        )


class ModelVerbalTeacher(VerbalTeacher):
    """A local causal LM as the verbal teacher, with its own tokenizer and chat template.

    ``mode`` as ``teacher.mode`` (:class:`~opcd.teachers.teacher.TeacherWeights`): ``model``
    (a separate model, any tokenizer: pass it as ``tokenizer``), ``frozen`` (the initial
    student; under LoRA the student with its adapter off) or ``live`` (the current student
    weights); the last two use the student's tokenizer. Conversations longer than the
    model's context (after room for the answer) are not run: their result is None.
    """

    def __init__(
        self,
        mode: str,
        student: nn.Module,
        student_tokenizer: object,
        model: nn.Module | None = None,
        tokenizer: object | None = None,
        *,
        batch_size: int = 8,
        name: str = "the teacher",
    ) -> None:
        if mode == "model" and (model is None or tokenizer is None):
            raise ValueError("teacher mode 'model' needs a teacher model and its tokenizer")
        self.mode, self.name, self.batch_size = mode, name, batch_size
        self.weights = TeacherWeights(mode, student, model)
        self.tokenizer = tokenizer if mode == "model" else student_tokenizer
        tok = self.tokenizer
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)  # type: ignore[attr-defined]
        with self.weights.scorer() as m:
            self.max_len = int(getattr(m.config, "max_position_embeddings", 0) or 1 << 30)
        self._digits: list[int] | None = None

    @property
    def separate_model(self) -> nn.Module | None:
        """The teacher's own weights when it has them (frozen copy or other model)."""
        return self.weights.model

    def encode(self, conversation: Conversation, prefill: str = "") -> list[int]:
        from opcd.tasks.chat import encode_chat

        ids = encode_chat(self.tokenizer, conversation)  # type: ignore[arg-type]
        if prefill:
            ids += list(self.tokenizer(prefill, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        return ids

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int,
        temperature: float,
        prefills: Sequence[str] | None = None,
    ) -> list[Generation | None]:
        from opcd.sampling import rollout

        prompts = [self.encode(c, prefills[i] if prefills else "") for i, c in enumerate(conversations)]
        fits = [i for i, p in enumerate(prompts) if len(p) + max_new_tokens <= self.max_len]
        out: list[Generation | None] = [None] * len(prompts)
        if fits:
            with self.weights.scorer() as model:
                roll = rollout.sample(
                    model, self.tokenizer, [prompts[i] for i in fits], n=1,  # type: ignore[arg-type]
                    temperature=temperature, max_new_tokens=max_new_tokens,
                    batch_size=self.batch_size,
                )
            for i, text, cut in zip(fits, roll.texts, roll.truncated, strict=True):
                out[i] = Generation(text, not cut)
        return out

    @torch.no_grad()
    def digit_logprobs(self, conversations: Sequence[Conversation]) -> list[Tensor | None]:
        from opcd.teachers.scoring import pack, response_logits

        if self._digits is None:
            self._digits = digit_token_ids(self.tokenizer, self.name)
        prompts = [self.encode(c) for c in conversations]
        fits = [i for i, p in enumerate(prompts) if len(p) < self.max_len]
        out: list[Tensor | None] = [None] * len(prompts)
        with self.weights.scorer() as model:
            device = next(model.parameters()).device
            for s in range(0, len(fits), self.batch_size):
                rows = fits[s : s + self.batch_size]
                # An empty "response": the one position read is the one after the prompt.
                batch = pack([prompts[i] for i in rows], [[] for _ in rows], self.pad_id, device=device)
                logp = torch.log_softmax(response_logits(model, batch)[:, 0], dim=-1)
                for i, row in zip(rows, logp[:, self._digits].cpu(), strict=True):
                    out[i] = row
        return out


__all__ = ["DIGITS", "Conversation", "Generation", "ModelVerbalTeacher", "VerbalTeacher", "digit_token_ids"]
