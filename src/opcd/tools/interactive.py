"""``opcd chat``: talk to a model in the terminal, with or without a context, to see what a
distillation changed before running an evaluation.

Where it sits: the CLI resolves the model reference or run folder and loads the model(s)
(:func:`open_chat`), then feeds the lines it reads from stdin to :func:`chat_session`, a
generator of transcript :class:`Event` s that needs no terminal (the tests script it).
Conversations go through :mod:`opcd.tasks.chat` (the context is inserted as in training) and
answers are sampled by :func:`opcd.sampling.rollout.sample`, seeded per turn from ``--seed``, so the
same input gives the same transcript.

A chat has one or two *lanes*, each a model and an optional context, answering every user
turn in order:

* plain: the model, with the context as its system prompt if one is given;
* ``--side-by-side``: the same model without and with the context;
* ``--compare-base`` (a run folder): the run's base model with the run's context (the
  teacher's view) beside the distilled model without it.

Each lane keeps its own history (its own earlier answers). ``/reset`` clears the histories,
``/exit`` (or the end of the input) ends the chat; a line starting with ``//`` is sent with
one ``/`` removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from opcd.config import Config, load_config
from opcd.errors import ConfigError, ModelError, RunFolderError
from opcd.sampling import rollout
from opcd.tasks.base import derive_seed
from opcd.tasks.chat import encode_chat, insert_context, task_context

EventKind = Literal["user", "answer", "reset", "note"]
COMMANDS = "/reset clears the history, /exit (or end of input) quits"


@dataclass(frozen=True)
class ChatContext:
    """A context and where it goes: the ``system`` message or the first ``user`` turn."""

    text: str
    placement: str = "system"
    user_template: str = "{context}\n\n{prompt}"
    source: str = "--context"
    """Where it came from (shown in the header)."""


@dataclass
class Lane:
    """One model answering every turn, with its own context and history."""

    label: str
    model: Any
    tokenizer: Any
    context: ChatContext | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user: str) -> list[dict[str, str]]:
        """The conversation this lane's model reads for the next answer."""
        turns = [*self.history, {"role": "user", "content": user}]
        if self.context is None:
            return turns
        return insert_context(turns, self.context.text, self.context.placement,
                              self.context.user_template)


@dataclass(frozen=True)
class ChatOptions:
    """How answers are sampled; ``temperature`` 0 is greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens} must be at least 1.")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature} must be 0 (greedy) or more.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p} must be in (0, 1].")


@dataclass(frozen=True)
class Event:
    """One transcript entry: a user turn, a lane's answer, a reset, or a note."""

    kind: EventKind
    text: str
    label: str = ""
    turn: int = 0
    prompt_ids: tuple[int, ...] = ()
    """answer: the token ids the lane's model was prompted with."""
    truncated: bool = False
    """answer: cut at ``max_new_tokens`` (no end-of-sequence token)."""


# --------------------------------------------------------------------------- the session
def _too_long(lanes: list[Lane], prompts: list[list[int]], new_tokens: int) -> str | None:
    """Why this turn cannot be answered within a lane's model's window (None: it can)."""
    for lane, ids in zip(lanes, prompts, strict=True):
        window = getattr(getattr(lane.model, "config", None), "max_position_embeddings", None)
        if isinstance(window, int) and len(ids) + new_tokens > window:
            return (f"[{lane.label}] the conversation is {len(ids)} tokens: with {new_tokens} "
                    f"new tokens it would pass the model's {window}-token window; this turn is "
                    "not answered. /reset to start again, or lower --max-new-tokens.")
    return None


def chat_session(lanes: list[Lane], lines: Iterable[str],
                 options: ChatOptions | None = None) -> Iterator[Event]:
    """Run a chat over ``lines`` (read one at a time, as they come) and yield its events.

    Per user line: a ``user`` event, then one ``answer`` per lane in order. Every lane of a
    turn samples with the same seed, derived from ``options.seed`` and the turn's number
    (counted across resets). Blank lines are skipped; see the module docstring for commands.
    """
    opts = options or ChatOptions()
    turn = 0
    for raw in lines:
        text = raw.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                for lane in lanes:
                    lane.history.clear()
                yield Event("reset", "history cleared")
            else:
                yield Event("note", f"unknown command {command}: {COMMANDS} (start a message "
                            "with // to send a leading /)")
            continue
        if text.startswith("//"):
            text = text[1:]
        turn += 1
        yield Event("user", text, turn=turn)
        prompts = [encode_chat(lane.tokenizer, lane.messages(text)) for lane in lanes]
        problem = _too_long(lanes, prompts, opts.max_new_tokens)
        if problem:
            yield Event("note", problem, turn=turn)
            continue
        seed = derive_seed("chat", opts.seed, turn)
        for lane, ids in zip(lanes, prompts, strict=True):
            out = rollout.sample(lane.model, lane.tokenizer, [ids], n=1,
                                 temperature=opts.temperature, top_p=opts.top_p,
                                 max_new_tokens=opts.max_new_tokens, batch_size=1, seeds=[seed])
            answer = out.texts[0].strip()
            lane.history += [{"role": "user", "content": text},
                             {"role": "assistant", "content": answer}]
            yield Event("answer", answer, label=lane.label, turn=turn, prompt_ids=tuple(ids),
                        truncated=out.truncated[0])


def format_event(event: Event) -> str:
    """The event as transcript text (an answer's later lines indented by two spaces)."""
    if event.kind == "user":
        return f"you> {event.text}"
    if event.kind == "answer":
        body = event.text or "(empty answer)"
        if event.truncated:
            body += " [... cut at --max-new-tokens]"
        return f"[{event.label}] " + body.replace("\n", "\n  ")
    return f"-- {event.text} --"


def transcript(lanes: list[Lane], lines: Iterable[str], options: ChatOptions | None = None) -> str:
    """The whole transcript of a scripted chat, as text."""
    return "\n".join(format_event(e) for e in chat_session(lanes, lines, options))


# --------------------------------------------------------------------------- setting up
@dataclass(frozen=True)
class Target:
    """What ``opcd chat MODEL_OR_RUN`` names: a loadable model reference, and the run
    folder and its config when it is a run folder."""

    model: str
    run_dir: Path | None = None
    config: Config | None = None


def resolve_target(ref: str) -> Target:
    """A run folder (``config.yaml`` + ``final/``) becomes its final model; anything else is
    passed on as a model reference (:func:`opcd.models.load_model`)."""
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():
        final = path / "final"
        if not final.is_dir():
            raise RunFolderError(
                f"The run folder {ref!r} has no final/ model yet (an unfinished run?). Finish it "
                f"with `opcd train {path / 'config.yaml'} --resume`, or chat with a model "
                "instead (a packaged name, a model folder or a .gguf file)."
            )
        return Target(str(final), path, load_config(path / "config.yaml"))
    parent = path.parent
    if not path.exists() and parent != Path(".") and parent.is_dir():
        raise ModelError(
            f"There is no model or run folder at {ref!r} (the folder {str(parent)!r} exists, but "
            f"holds no {path.name!r}). Check the name: pass a run folder written by `opcd train`, "
            "a model folder with config.json and *.safetensors, a .gguf file, or a packaged "
            "model name (see `opcd models`)."
        )
    return Target(ref)


def read_context(text: str | None, path: str | None) -> ChatContext | None:
    """The context of ``--context TEXT`` or ``--context-file PATH`` (at most one)."""
    from opcd.tasks.base import read_context_file

    if text is not None and path is not None:
        raise ConfigError("Give the context either as --context TEXT or as --context-file PATH, "
                          "not both.")
    if path is not None:
        return ChatContext(read_context_file(path, "--context-file"), source=f"file {path}")
    if text is not None:
        if not text.strip():
            raise ConfigError("--context is empty: give the text of the context, or leave it out "
                              "to chat without one.")
        return ChatContext(text)
    return None


def run_chat_context(target: Target) -> ChatContext:
    """The context the run distilled, placed as in its training."""
    from opcd.tasks import build_task

    assert target.config is not None
    task = build_task(target.config.task)
    text = task_context(task)
    if not text:
        raise ConfigError(
            f"The run {str(target.run_dir)!r} (task {task.name}) has no single context to show "
            "(its examples carry their own). Give one with --context TEXT or --context-file PATH."
        )
    return ChatContext(text, task.placement, task.user_template, f"the run's task ({task.name})")


@dataclass
class ChatSetup:
    """The lanes of a chat and a header describing them."""

    lanes: list[Lane]
    header: str


def _short(text: str, limit: int = 70) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")


def plan_lanes(ref: str, *, context: str | None = None, context_file: str | None = None,
               side_by_side: bool = False,
               compare_base: bool = False) -> list[tuple[str, str, ChatContext | None]]:
    """Check the options and say which lanes to build: (label, model reference, context)
    each. Nothing is loaded: every user error is raised here first."""
    if side_by_side and compare_base:
        raise ConfigError("Choose one of --side-by-side (the model without and with the context) "
                          "and --compare-base (the run's base model with the context vs the "
                          "distilled model without it).")
    given = read_context(context, context_file)
    target = resolve_target(ref)
    if compare_base:
        if target.config is None:
            raise ConfigError(
                f"--compare-base needs a run folder (with config.yaml and final/), but {ref!r} is a "
                "model. Pass the run folder `opcd train` wrote, or use --side-by-side with "
                "--context to compare a model without and with a context."
            )
        ctx = given or run_chat_context(target)
        return [("base + context", target.config.model, ctx), ("distilled", target.model, None)]
    if side_by_side:
        ctx = given or (run_chat_context(target) if target.config is not None else None)
        if ctx is None:
            raise ConfigError("--side-by-side shows the model without and with a context: give "
                              "it with --context TEXT or --context-file PATH.")
        return [("without context", target.model, None), ("with context", target.model, ctx)]
    return [("with context" if given else "model", target.model, given)]


def open_chat(ref: str, *, context: str | None = None, context_file: str | None = None,
              side_by_side: bool = False, compare_base: bool = False,
              device: str | None = None) -> ChatSetup:
    """Resolve ``ref`` (model reference or run folder), check the options, load the model(s)
    (each once) and return the chat's lanes."""
    from opcd.models import load_model

    plan = plan_lanes(ref, context=context, context_file=context_file,
                      side_by_side=side_by_side, compare_base=compare_base)
    loaded: dict[str, tuple[Any, Any]] = {}
    lanes = []
    for label, model_ref, ctx in plan:
        if model_ref not in loaded:
            loaded[model_ref] = load_model(model_ref, device=device)
        model, tok = loaded[model_ref]
        lanes.append(Lane(label, model, tok, ctx))
    desc = "; ".join(
        f"[{label}] {model_ref}"
        + (f" + context from {ctx.source} ({ctx.placement}): {_short(ctx.text)}" if ctx else "")
        for label, model_ref, ctx in plan
    )
    return ChatSetup(lanes, f"opcd chat: {desc}\n{COMMANDS}.")


def stdin_lines(prompt: str = "") -> Iterator[str]:
    """Lines typed on stdin (``input`` with ``prompt``) until the end of the input."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return
