"""Typed run configuration: YAML file + dotted ``key=value`` overrides, validated.

A run is described by one :class:`Config` (sections ``task``, ``teacher``, ``rollout``,
``loss``, ``train``, ``lora``, ``eval``, ``run``, ``guard``, ``perf``, and ``ovd`` for ``method: ovd``).
``load_config(path, overrides)`` reads a YAML file, applies command-line overrides such as
``train.lr=1e-5`` or ``teacher.mode=frozen`` (values are parsed as YAML scalars), and checks
every key and value. Unknown keys list the valid ones and suggest the closest; wrong types
and values out of range name the field and what it accepts. Errors are :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from opcd.errors import ConfigError

TeacherMode = Literal["frozen", "model", "live", "server"]
Objective = Literal["reverse_kl", "forward_kl", "jsd", "akl", "sampled_token"]
Reduction = Literal["token_mean", "seq_mean"]
ContextPlacement = Literal["system", "user"]
Method = Literal["opcd", "ovd", "offpolicy"]
OffPolicyLoss = Literal["fkl", "sft"]
ScoreMode = Literal["generate", "expected"]
Replace = Literal["whole", "suffix"]
RolloutBackendName = Literal["hf", "vllm"]
RolloutDtype = Literal["auto", "model", "float32", "bfloat16", "float16"]
TrackerName = Literal["tensorboard", "wandb", "trackio"]


@dataclass
class TaskConfig:
    """What to distil: the context and the prompts it applies to."""

    name: str = "french"
    """A built-in task (see ``opcd.tasks.TASKS``), or ``system_prompt`` for your own data."""
    context: str | None = None
    """The context c. For built-in tasks this overrides the task's own context."""
    context_file: str | None = None
    """A text file whose non-blank lines are the context (e.g. an experience file written by
    ``opcd extract``); excludes ``context``. No lines: a DataError."""
    placement: ContextPlacement | None = None
    """Where c goes: ``system`` message or into the ``user`` turn (default: the task's)."""
    user_template: str = "{context}\n\n{prompt}"
    """For ``placement: user``: how c and the prompt are joined ({context}, {prompt})."""
    prompts: str | None = None
    """JSONL file of user prompts (``{"prompt": ..., "id": ..., "context": ...}``)."""
    behaviour: str | list[str] | None = None
    """Scorer for ``system_prompt`` tasks: a spec such as ``language:fr`` or ``max_words:50``,
    or a list of specs that must all hold (see ``opcd.tasks.behaviours``); for ``suite``,
    the name of a suite entry."""
    eval_fraction: float = 0.25
    """Share of the prompts held out for evaluation (split by ``seed``)."""
    seed: int = 0
    families: list[str] | None = None
    """Math tasks: the reasoning-gym generators to draw problems from (default: the task's)."""
    train_size: int | None = None
    """Generated / sampled tasks (math, games, safety): examples in ``train`` (None: default)."""
    eval_size: int | None = None
    """Examples in the ``eval`` (validation) split (None: the task's default)."""
    test_size: int | None = None
    """Examples in the ``test`` split (None: the task's default)."""
    other_system_prompt_share: float = 0.0
    """OPCD: the share of training rows given a system message of their own, drawn from
    ``other_system_prompts`` (see ``other_system_prompt_mode`` and
    ``opcd.tasks.other_system_prompts``). 0: every row without one (the chat template's
    default). Off by default for now; 0.5 with ``replace`` and the built-in pool kept the
    suite's other system prompts at the base's rates on three seeds, at some cost in how
    fast the behaviour itself is learnt (docs/objectives.md)."""
    other_system_prompt_rows: int = 0
    """OPCD: extra rows per step on top of ``train.batch_size``: the step's first N prompts
    again, each with a system message drawn from ``other_system_prompts`` (the teacher sees
    what ``other_system_prompt_mode`` says). Unlike ``other_system_prompt_share`` they take no
    row from the behaviour itself, at the cost of N more rows to sample and train on. Not
    recommended: with N=4 of 8 the Spanish student learnt the behaviour on 3 seeds of 3 but
    dropped the other system prompts' rules (-0.42 to -0.45 on the suite's greeting,
    bullet-point and JSON prompts), where share 0.5 kept them (docs/objectives.md)."""
    other_system_prompts: str | None = None
    """A text file with one system prompt per line for ``other_system_prompt_share`` and
    ``other_system_prompt_rows`` (None: the built-in pool of role prompts and prompts with
    format, length and language rules)."""
    other_system_prompt_mode: Literal["compose", "replace"] = "replace"
    """What the teacher sees on those rows: ``compose``, the context in front of the row's
    system message (the behaviour holds under any system prompt); ``replace`` (default), the row's
    system message alone (the context becomes the default system prompt, which a user's own
    replaces, as in context)."""


@dataclass
class TeacherConfig:
    """Who scores the student's tokens with the context."""

    mode: TeacherMode = "frozen"
    """frozen: a frozen copy of the initial student; model: another frozen model; live: the
    current student weights under no_grad; server: a model behind a vLLM server
    (``server_url``; see ``opcd.teachers.teacher_server``)."""
    model: str | None = None
    """The teacher model for ``mode: model`` (must share the student's tokenizer)."""
    server_url: str | None = None
    """``mode: server``: the server's OpenAI-compatible base URL, e.g. http://host:8000/v1."""
    server_model: str | None = None
    """``mode: server``: the model name the server serves (must share the student's tokenizer)."""
    server_top_k: int = 20
    """``mode: server``: top log-probs requested per position (the server's --max-logprobs
    must allow it); the forward KL runs over these slots."""
    server_timeout_s: float = 300.0
    server_concurrency: int = 8
    """``mode: server``: scoring requests in flight at once."""


@dataclass
class RolloutConfig:
    """How the student samples its own responses (without the context)."""

    n: int = 1
    """Responses sampled per prompt."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 16
    """Sequences generated together."""
    max_prompt_tokens: int = 2048
    """Longest teacher prompt (context + prompt) accepted."""
    truncate_prompts: bool = False
    """Truncate over-long prompts from the left (logged) instead of refusing them."""
    backend: RolloutBackendName = "hf"
    """Who samples: ``hf`` (opcd's KV-cache loop / HF generate on the training model; CPU and
    GPU) or ``vllm`` (a vLLM engine on the training GPU, weights synced after every update;
    optional extra, CUDA only, method=opcd on one process; not yet run on a GPU). See
    ``opcd.sampling.rollout_backends`` and docs/scale.md."""
    vllm_gpu_memory_utilization: float = 0.3
    """rollout.backend=vllm: the share of the GPU's memory the vLLM engine may take (weights
    and its key/value cache), in (0, 1]; the rest is left to training."""
    dtype: RolloutDtype = "auto"
    """rollout.backend=hf: ``auto`` (default) measures this CPU once (:mod:`opcd.sampling.probe`) and
    samples from a bf16 copy where bf16 products are at least 1.5x faster than fp32 ones,
    else with the training model (always the training model on a GPU or when it is not
    fp32); the choice and its figures are printed at start. ``model`` samples with the
    training model itself; another dtype
    (e.g. ``bfloat16``) samples with a copy of the student in that dtype, refreshed after
    every update: decoding reads half the bytes per token, and CPUs with bf16 matrix units
    (AMX) multiply several times faster. The samples then come from the rounded weights
    (nearly, not exactly, on-policy); the loss and evaluation keep the training dtype."""


@dataclass
class LossConfig:
    """The per-token objective."""

    objective: Objective = "forward_kl"
    """forward_kl (default: on the student's own samples, the teacher's likely tokens are
    raised in one step, see docs/objectives.md), reverse_kl (the paper's), jsd (``beta``),
    akl (forward and reverse KL mixed per token, see :mod:`opcd.objectives.losses`) or sampled_token
    (the per-token advantage log p_t(y_t) - log p_s(y_t) with a policy-gradient loss)."""
    top_k: int = 256
    tail: bool = True
    """Add the rest of the vocabulary as one more bucket beside the k slots, for both models,
    so the objective is a true divergence (>= 0; moving the student's mass out of the slots
    raises it). ``tail: false`` with ``renormalize: false`` is the reference code's formula,
    which the student can minimise by breaking (see docs/objectives.md). Ignored with
    ``renormalize``."""
    renormalize: bool = False
    """Renormalise both distributions over the k slots."""
    union: bool = True
    """Slots = union of the student's and the teacher's top-k (false: the student's top-k,
    as in the paper)."""
    beta: float = 0.5
    """JSD mixture weight (objective: jsd)."""
    reduction: Reduction = "token_mean"
    """token_mean over the batch's response tokens, or seq_mean (the paper's 1/|y|)."""


@dataclass
class TrainConfig:
    """The optimisation."""

    steps: int = 50
    batch_size: int = 8
    """Prompts per step (one update per rollout batch: strictly on-policy)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward (gradient accumulation bounds memory)."""
    lr: float = 5e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    freeze_embeddings: bool = False
    """Keep the input embeddings (and an untied output head) frozen."""
    gradient_checkpointing: bool = False
    max_consecutive_skips: int = 3
    """A step whose loss or gradient norm is not finite is skipped (no update); after this
    many such steps in a row the run stops with a NumericalError."""


@dataclass
class LoraConfig:
    """Optional LoRA (peft); the frozen teacher is then the base with the adapter off."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class EvalConfig:
    """Periodic evaluation on held-out prompts without the context."""

    every: int = 0
    """Evaluate every N steps (0: only at the start and the end)."""
    size: int = 32
    """Held-out prompts scored per evaluation."""
    max_new_tokens: int = 48
    temperature: float = 1.0
    seed: int = 1234
    with_context: bool | None = None
    """Also score the model with the context (the in-context ceiling), at start. None
    (default): yes for system-prompt tasks (french, system_prompt, suite) and knowledge, no otherwise."""
    require_lift: bool = True
    """With the in-context score measured: stop before training when the context does not
    raise the score above the model's own (nothing to distil); false trains anyway."""


@dataclass
class RunConfig:
    """Where and how often things are written."""

    dir: str = "runs/opcd"
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept (older ones deleted)."""
    plot: bool = True
    report_to: list[TrackerName] = field(default_factory=list)
    """Experiment trackers that also get every ``metrics.jsonl`` record (train steps as
    scalars at their step, evaluations as ``eval/<task>/score`` ..., the answers as a
    table) and the config, from the main process: ``tensorboard`` (written under
    ``<run.dir>/tensorboard/``), ``wandb`` (WANDB_MODE=offline works without an account),
    ``trackio``. One name or a list; [] (default): none. Each is an optional extra, e.g.
    ``pip install 'opcd[tensorboard]'``; a missing one is reported before any model is
    loaded. See :mod:`opcd.runtime.tracking`."""
    tracking_project: str = "opcd"
    """The wandb / trackio project the run is logged in (the run is named after run.dir's
    last folder)."""
    push_to_hub: str | None = None
    """A Hugging Face hub repo id (``user/name`` or ``org/name``): at the end of a successful
    run the main process writes a model card (``README.md``: base model, context, settings,
    scores from ``metrics.jsonl``) into ``final/`` and uploads ``final/`` to that repo (needs
    ``hf auth login`` or ``HF_TOKEN``, and internet). A failed push keeps the local model and
    says how to retry: ``opcd push RUN_DIR REPO_ID``. None (default): nothing is uploaded.
    See :mod:`opcd.tools.hub`."""
    hub_private: bool = True
    """run.push_to_hub: create the repo private (default); an existing repo keeps its
    visibility."""


GuardAction = Literal["stop", "warn", "off"]


@dataclass
class GuardConfig:
    """The collapse guard (:mod:`opcd.training.guard`): figures checked against their start values."""

    action: GuardAction = "stop"
    """stop: end the run and keep the last state that passed every check as ``final/``;
    warn: say so and go on; off: no checks (and no copies of the weights)."""
    max_entropy_rise: float = 3.0
    """Nats the student's entropy (at its sampled tokens) may rise above the first step's
    (measured: a French system prompt learnt by forward KL peaked at +2.0 for one step; the
    reference formula's collapse reached +5 and then +8.5)."""
    min_topk_mass_ratio: float = 0.7
    """The student's top-k mass may not fall below this share of the first step's."""
    max_quality_drop: float = 2.0
    """Nats per token the answers' quality (how natural the frozen base model, given the
    context, finds them: see opcd.eval.evaluate) may fall below the first evaluation's (measured:
    -1.2 while a student switched language mid-answer, recovering to 0 two steps later;
    garbage tokens score log p ~ -15 where the entropy is ~2)."""
    max_final_quality_drop: float = 1.0
    """The same, for the run's last evaluation: the model a run presents as its result must
    be close to the base's quality; the bound mid-run is looser because a student learning a
    behaviour passes through mixed answers (measured on the French prompt, 17 runs: final
    quality -0.68 at worst for the objectives that kept the answers fluent, mid-run -1.4;
    the reference code's objective ended at -1.70 with answers turning into multilingual
    token soup). Needs an evaluation at the last step (it always runs)."""
    patience: int = 2
    """Steps in a row a per-step bound must be crossed before the guard acts."""


@dataclass
class PerfConfig:
    """Speed and memory switches; both off is the naive computation (for comparisons)."""

    prefix_cache: bool = True
    """Teacher: run each shared context prefix once and score every response against its
    keys/values (kept across steps while the teacher's weights do not change)."""
    chunked_loss: bool = True
    """Loss: project hidden states to logits chunk by chunk (never whole-batch [tokens, vocab])."""
    loss_chunk_tokens: int = 256
    """Tokens per loss chunk (peak extra memory is about 8 x tokens x vocab x 4 bytes)."""
    teacher_batch_size: int = 8
    """Rows per teacher forward."""
    prefix_block_tokens: int = 64
    """Cached prefixes are cut at multiples of this many tokens (reproducible reuse)."""
    prefix_cache_tokens: int = 16384
    """Most prefix tokens whose keys/values are kept (least recently used dropped)."""
    fused_optimizer: bool = True
    """AdamW's fused kernel: one pass over each parameter and no whole-model temporaries
    (torch's default multi-tensor AdamW allocates several copies of the weights' size per
    step). Falls back to the default where torch has no fused kernel for the parameters."""


@dataclass
class OvdConfig:
    """On-policy Verbal Distillation (``method: ovd``, see :mod:`opcd.methods.ovd`).

    The student samples ``rollout.n`` (>= 2) responses per prompt; the teacher rates each
    0-9 in words; responses rated below ``threshold`` are replaced by teacher text; the
    student is updated by a clipped policy gradient with group-normalised advantages.
    """

    score_prompt: str | None = None
    """The teacher's scoring request, with ``{problem}``, ``{response}`` and optionally
    ``{context}`` (None: the built-in prompt, see :data:`opcd.methods.ovd.SCORE_PROMPT`)."""
    score_mode: ScoreMode = "expected"
    """expected: the teacher's next-token probabilities over the digits 0-9 (one forward
    pass, sum of d * p(d)); generate: the teacher writes a short answer, the score is parsed."""
    score_max_new_tokens: int = 8
    """Tokens the teacher may write for its score (score_mode: generate; greedy)."""
    teacher_context: bool = True
    """The teacher sees the task's context c when scoring and when writing replacements."""
    threshold: float = 5.0
    """Responses whose verbal score is below this (0-9) are replaced (0: never)."""
    replace: Replace = "whole"
    """whole: the teacher answers the prompt itself; suffix: the student's first half (cut at
    a line or sentence end) is kept and the teacher continues it."""
    teacher_max_new_tokens: int | None = None
    """Longest teacher replacement, in teacher tokens (None: rollout.max_new_tokens)."""
    teacher_temperature: float | None = None
    """Sampling temperature of teacher replacements (None: rollout.temperature; 0: greedy)."""
    reward_weight: float | None = None
    """Reward = w * outcome + (1 - w) * verbal / 9. None: 1 for tasks with an outcome reward
    (math, gsm8k, games, safety), 0 (the verbal score alone) for the others."""
    clip_eps: float = 0.2
    """PPO clip range of the importance ratio."""
    step_level: bool = False
    """Multi-turn games only: the teacher rates every move in its situation and each move
    gets the sum of the normalised scores from it to the episode's end (process
    supervision); false: the teacher rates the whole episode, one score for all its moves."""


@dataclass
class OffPolicyConfig:
    """Off-policy context distillation (``method: offpolicy``, see :mod:`opcd.methods.offpolicy`).

    The teacher (with the context) samples the responses once (saved with its top-k
    log-probs, ``loss.top_k``, in the run folder); the student learns them without it.
    """

    loss: OffPolicyLoss = "fkl"
    """fkl: forward KL over the teacher's top-k; sft: token NLL of the teacher's tokens."""


@dataclass
class ExtractConfig:
    """Experiential knowledge extraction (``opcd extract``, see :mod:`opcd.tools.experience`)."""

    problems: int = 30
    """Training problems walked through per extraction run."""
    runs: int = 10
    """Extraction runs; run r draws its problems and samples with seed ``seed + r``."""
    seed: int = 0
    budget_tokens: int = 1024
    """Longest experience (tokens of the extractor's tokenizer); oldest items dropped first."""
    val_size: int = 32
    """Validation (``eval`` split) examples scored with the experience after each update."""
    model: str | None = None
    """The extractor (None: the student, ``model``), e.g. qwen2.5-coder-1.5b-instruct."""
    marker: str = "- EXPERIENCE ITEM:"
    """Lines starting with this are experience items; everything else is dropped."""
    max_new_tokens: int = 512
    """Longest solution and longest insight list the extractor writes."""
    temperature: float = 0.7
    """Sampling temperature of solutions and insights (0: greedy)."""
    prompt: str | None = None
    """The insight request ({problem}, {solution}, {experience}, {marker}); None: built-in."""
    dir: str = "runs/extract"
    """Where experience.txt and trace.jsonl go."""


@dataclass
class Config:
    """A whole OPCD (or OVD) run."""

    model: str = "qwen2.5-coder-0.5b-instruct"
    """The student: a registry name, a local HF directory, a GGUF file or a hub id."""
    method: Method = "opcd"
    """opcd: on-policy context distillation (teacher log-probs); ovd: on-policy verbal
    distillation (teacher 0-9 scores, any teacher tokenizer; the ``ovd`` section)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    ovd: OvdConfig = field(default_factory=OvdConfig)
    offpolicy: OffPolicyConfig = field(default_factory=OffPolicyConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields whose values must be > 0 (or >= 0); checked after types.
_POSITIVE = {
    "rollout.n", "rollout.max_new_tokens", "rollout.batch_size", "rollout.max_prompt_tokens",
    "rollout.temperature", "rollout.top_p", "loss.top_k", "train.steps", "train.batch_size",
    "train.micro_batch_size", "train.lr", "train.max_grad_norm", "lora.r", "lora.alpha",
    "eval.size", "eval.max_new_tokens", "run.keep_last", "train.max_consecutive_skips",
    "perf.loss_chunk_tokens", "perf.teacher_batch_size", "perf.prefix_block_tokens",
    "guard.max_entropy_rise", "guard.max_quality_drop", "guard.patience",
    "ovd.score_max_new_tokens", "ovd.clip_eps",
    "extract.problems", "extract.runs", "extract.budget_tokens", "extract.val_size",
    "extract.max_new_tokens",
}
_NON_NEGATIVE = {
    "train.weight_decay", "lora.dropout", "eval.every", "eval.temperature", "run.save_every",
    "perf.prefix_cache_tokens", "extract.temperature",
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, shortened: config values come from untrusted files."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def _check_text(value: str, key: str) -> str:
    """Refuse strings that cannot be written back as UTF-8 text or hold NUL characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"Config value {key} is not valid Unicode text (it holds a lone surrogate escape)."
        ) from None
    if "\x00" in value:
        raise ConfigError(f"Config value {key} contains a NUL character; remove it.")
    return value


def _finite(value: float, key: str) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"Config value {key}={_show(value)} must be a finite number.")
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        allowed = [str(a) for a in typing.get_args(tp)]
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"Config value {key}={_show(value)} is not allowed: use {_type_name(tp)}.{hint}"
        )
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"Config value {key}={_show(value)} has the wrong type: expected {_type_name(tp)}.")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"Config value {key}={_show(value)} has the wrong type: expected {_type_name(tp)}.")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return _finite(float(value), key)
            except OverflowError:
                raise ConfigError(f"Config value {key}={_show(value)} is too large.") from None
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _finite(number, key)
    elif tp is str:
        if isinstance(value, str):
            return _check_text(value, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"Config value {key}={_show(value)} has the wrong type: expected {_type_name(tp)}, "
        f"got {type(value).__name__}. Fix the value in the YAML file or the override."
    )


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        where = f"Config section {prefix.rstrip('.')!r}" if prefix else "The config"
        raise ConfigError(
            f"{where} must be a mapping of keys to values, got {type(data).__name__}. "
            "Write it as `key: value` lines in YAML."
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            valid = sorted(fields)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean {prefix}{close[0]!r}?" if close else ""
            raise ConfigError(
                f"Unknown config key {_show(full)}.{hint} Valid keys"
                f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)}."
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


@dataclass(frozen=True)
class MethodSupport:
    """One row of the table of valid combinations: what a method samples, how its rows are
    scored, what it minimises, and which settings it can use."""

    sampler: str
    scorer: str
    objective: str
    teacher_modes: tuple[str, ...]
    rollout_backends: tuple[str, ...]
    rollout_dtype: bool
    """A separate sampling copy in another dtype (``rollout.dtype``)."""
    processes: bool
    """Several processes (accelerate / torchrun), data parallel."""
    fsdp: bool
    """Several processes with the student sharded (an FSDP launch configuration)."""
    loss_keys: tuple[str, ...]
    """The ``loss.*`` settings it reads (the others are ignored: a note says so)."""


METHODS: dict[str, MethodSupport] = {
    "opcd": MethodSupport(
        sampler="the student without the context (rollout backend hf or vllm)",
        scorer="the teacher's log-probs with the context (local model or server)",
        objective="loss.objective over the top-k slots (+ the rest bucket)",
        teacher_modes=("frozen", "live", "model", "server"), rollout_backends=("hf", "vllm"),
        rollout_dtype=True, processes=True, fsdp=True,
        loss_keys=("objective", "top_k", "tail", "renormalize", "union", "beta", "reduction")),
    "offpolicy": MethodSupport(
        sampler="the teacher's own responses with the context, generated once and stored",
        scorer="the teacher's top-k log-probs, stored with its responses",
        objective="offpolicy.loss (forward KL over the teacher's top-k, or SFT)",
        teacher_modes=("frozen", "model"), rollout_backends=("hf",),
        rollout_dtype=False, processes=True, fsdp=True,
        loss_keys=("top_k", "tail", "renormalize", "reduction")),
    "ovd": MethodSupport(
        sampler="the student without the context, rollout.n responses a prompt",
        scorer="the verbal teacher's 0-9 score (low-scored responses replaced)",
        objective="a clipped policy gradient on group-normalised scores",
        teacher_modes=("frozen", "live", "model"), rollout_backends=("hf", "vllm"),
        rollout_dtype=True, processes=True, fsdp=True,
        loss_keys=("reduction",)),
}
"""Which sampler / scorer / objective each method is, and which settings it supports:
checked here when a config is built (:func:`_check_method`), and at launch for processes."""


def _check_method(cfg: Config) -> None:
    """Refuse the settings ``cfg.method`` cannot honour, from :data:`METHODS`."""
    m = METHODS[cfg.method]
    allowed = [k for k, v in METHODS.items() if cfg.teacher.mode in v.teacher_modes]
    if cfg.teacher.mode not in m.teacher_modes:
        why = (" (its teacher responses are generated once and reused)" if cfg.method == "offpolicy"
               else "")
        raise ConfigError(
            f"teacher.mode={cfg.teacher.mode} is not supported by method={cfg.method}{why}: use "
            f"teacher.mode={' or '.join(m.teacher_modes)} (teacher.mode={cfg.teacher.mode} works "
            f"with method={' or '.join(allowed)})."
        )
    if cfg.rollout.backend not in m.rollout_backends:
        raise ConfigError(
            f"rollout.backend={cfg.rollout.backend} is not supported for method={cfg.method} yet "
            f"(it samples {m.sampler}). Use the default rollout.backend=hf."
        )
    if cfg.rollout.dtype not in ("model", "auto") and not m.rollout_dtype:
        raise ConfigError(
            f"rollout.dtype={cfg.rollout.dtype} is not supported for method={cfg.method} (it "
            f"samples {m.sampler}). Remove rollout.dtype."
        )


def ignored_settings(cfg: Config) -> list[str]:
    """The ``loss.*`` settings changed from their defaults that ``cfg.method`` does not read
    (from :data:`METHODS`), as ``key=value`` strings."""
    m = METHODS[cfg.method]
    default = LossConfig()
    return [f"loss.{f.name}={getattr(cfg.loss, f.name)}" for f in dataclasses.fields(LossConfig)
            if f.name not in m.loss_keys and getattr(cfg.loss, f.name) != getattr(default, f.name)]


def _check_ranges(cfg: Config) -> None:
    flat = flatten(cfg.to_dict())
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"Config value {key}={flat[key]!r} must be greater than 0.")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"Config value {key}={flat[key]!r} must be 0 or more.")
    if not 0 < cfg.guard.min_topk_mass_ratio <= 1:
        raise ConfigError(f"Config value guard.min_topk_mass_ratio={cfg.guard.min_topk_mass_ratio} "
                          "must be in (0, 1]: the share of the first step's top-k mass kept.")
    if cfg.rollout.top_p > 1:
        raise ConfigError(f"Config value rollout.top_p={cfg.rollout.top_p} must be in (0, 1].")
    if cfg.loss.objective == "jsd" and not 0 < cfg.loss.beta < 1:
        raise ConfigError(f"Config value loss.beta={cfg.loss.beta} must be strictly between 0 and 1.")
    share = cfg.task.other_system_prompt_share
    if not 0 <= share <= 1:
        raise ConfigError(
            f"Config value task.other_system_prompt_share={share} must be in [0, 1]: the share of "
            "training rows given a system prompt from task.other_system_prompts."
        )
    extra = cfg.task.other_system_prompt_rows
    if not 0 <= extra <= cfg.train.batch_size:
        raise ConfigError(
            f"Config value task.other_system_prompt_rows={extra} must be between 0 and "
            f"train.batch_size={cfg.train.batch_size}: the step's first N prompts are repeated "
            "with another system prompt."
        )
    for key, value in (("share", share), ("rows", extra)):
        if value > 0 and (cfg.method != "opcd" or cfg.task.name in ("frozenlake", "sokoban")):
            raise ConfigError(
                f"task.other_system_prompt_{key}={value} applies to OPCD's one-turn prompts only "
                f"(method={cfg.method}, task.name={cfg.task.name}). Set it to 0."
            )
    if cfg.task.other_system_prompts is not None and share == 0 and extra == 0:
        raise ConfigError(
            "task.other_system_prompts is set but task.other_system_prompt_share and "
            "task.other_system_prompt_rows are 0, so no row would use it. Set one of them "
            "(e.g. task.other_system_prompt_rows=4) or remove task.other_system_prompts."
        )
    if not 0 < cfg.task.eval_fraction < 1:
        raise ConfigError(
            f"Config value task.eval_fraction={cfg.task.eval_fraction} must be strictly between 0 and 1."
        )
    if cfg.teacher.mode == "model" and not cfg.teacher.model:
        raise ConfigError(
            "teacher.mode=model needs teacher.model: the name or path of the teacher model "
            "(it must share the student's tokenizer), e.g. teacher.model=qwen2.5-coder-1.5b-instruct."
        )
    if cfg.teacher.mode != "model" and cfg.teacher.model:
        raise ConfigError(
            f"teacher.model={cfg.teacher.model!r} is set but teacher.mode={cfg.teacher.mode!r}; "
            "set teacher.mode=model to use a separate teacher, or remove teacher.model."
        )
    if "{prompt}" not in cfg.task.user_template or "{context}" not in cfg.task.user_template:
        raise ConfigError(
            f"task.user_template={cfg.task.user_template!r} must contain both {{context}} and {{prompt}}."
        )
    _check_ovd(cfg)
    _check_method(cfg)
    _check_rollout_backend(cfg)
    _check_server_teacher(cfg)
    if cfg.task.context is not None and cfg.task.context_file is not None:
        raise ConfigError("Set task.context or task.context_file, not both.")
    project = cfg.run.tracking_project
    if not project.strip() or len(project) > 128 or any(c in project for c in '/\\#?%:'):
        raise ConfigError(
            f"Config value run.tracking_project={_show(project)} is not a usable project name: "
            "use 1 to 128 characters without / \\ # ? % or :, e.g. run.tracking_project=opcd."
        )
    if cfg.run.push_to_hub is not None:
        check_repo_id(cfg.run.push_to_hub, "Config value run.push_to_hub")
    if cfg.extract.prompt is not None:
        missing = [p for p in ("{problem}", "{solution}") if p not in cfg.extract.prompt]
        if missing:
            raise ConfigError(
                f"extract.prompt must contain {' and '.join(missing)} (placeholders: {{problem}}, "
                "{solution}, optionally {experience} and {marker})."
            )


_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")


def check_repo_id(repo_id: str, where: str) -> None:
    """Raise :class:`ConfigError` unless ``repo_id`` is a hub repo id ``namespace/name`` (the
    hub's rules: letters, digits, ``-``, ``_``, ``.``; 1 to 96 characters a part, starting and
    ending with a letter or digit, no ``--`` or ``..``). ``where`` starts the message."""
    parts = repo_id.split("/")
    if len(parts) == 2 and all(_REPO_PART.fullmatch(x) and "--" not in x and ".." not in x
                               for x in parts):
        return
    raise ConfigError(
        f"{where} {_show(repo_id)} is not a Hugging Face repo id: write it as user/name or "
        "org/name (letters, digits, '-', '_' and '.', at most 96 characters each, starting and "
        "ending with a letter or digit, no '--' or '..'), e.g. alice/qwen-french-opcd."
    )


def _check_server_teacher(cfg: Config) -> None:
    """``teacher.mode=server``: its settings, and the objectives its sparse scores allow."""
    t = cfg.teacher
    if t.mode != "server":
        if t.server_url or t.server_model:
            raise ConfigError(f"teacher.server_url / server_model are set but teacher.mode={t.mode!r}; "
                              "set teacher.mode=server to score through the server, or remove them.")
        return
    if not t.server_url or not t.server_model:
        raise ConfigError("teacher.mode=server needs teacher.server_url (e.g. http://localhost:8000/v1) "
                          "and teacher.server_model (the name the server serves).")
    objective_ok = cfg.loss.objective in ("sampled_token", "forward_kl")
    union = objective_ok and cfg.loss.union and cfg.loss.objective != "sampled_token"
    if not objective_ok or union:
        raise ConfigError(
            f"loss.objective={cfg.loss.objective}{' with loss.union=true' if union else ''} "
            "needs the teacher's log-probs at the student's top-k tokens, which a server does not "
            "return: with teacher.mode=server use loss.objective=sampled_token or forward_kl "
            "(over the teacher's top-k), loss.union=false."
        )
    if cfg.rollout.temperature != 1.0:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature}: the server's log-probs are "
                          "of the raw model (temperature 1); use rollout.temperature=1.0 with "
                          "teacher.mode=server.")
    for key, value in (("server_top_k", t.server_top_k), ("server_timeout_s", t.server_timeout_s),
                       ("server_concurrency", t.server_concurrency)):
        if value <= 0:
            raise ConfigError(f"Config value teacher.{key}={value!r} must be greater than 0.")


def _check_rollout_backend(cfg: Config) -> None:
    """``rollout.backend`` settings (whether vLLM and CUDA exist is checked when training starts)."""
    r = cfg.rollout
    if not 0 < r.vllm_gpu_memory_utilization <= 1:
        raise ConfigError(
            f"Config value rollout.vllm_gpu_memory_utilization={r.vllm_gpu_memory_utilization} "
            "must be in (0, 1]: the share of the GPU's memory the vLLM engine may take, e.g. 0.3."
        )
    if r.backend == "vllm" and r.dtype not in ("model", "auto"):
        raise ConfigError(
            f"rollout.dtype={r.dtype} applies to rollout.backend=hf; the vLLM engine samples in "
            "the model's dtype. Remove rollout.dtype or use rollout.backend=hf."
        )


def _check_ovd(cfg: Config) -> None:
    """The ``ovd`` section's ranges, and a group of responses per prompt for ``method: ovd``."""
    o = cfg.ovd
    if cfg.method == "ovd" and cfg.rollout.n < 2:
        raise ConfigError(
            f"method=ovd needs a group of responses per prompt: rollout.n={cfg.rollout.n} must be "
            "at least 2 (advantages are normalised within each prompt's group), e.g. rollout.n=4."
        )
    if not 0 <= o.threshold <= 9:
        raise ConfigError(
            f"Config value ovd.threshold={o.threshold} must be between 0 and 9 (the verbal score "
            "scale; responses scored below it are replaced, 0 turns replacement off)."
        )
    if not o.clip_eps < 1:
        raise ConfigError(f"Config value ovd.clip_eps={o.clip_eps} must be in (0, 1).")
    if o.reward_weight is not None and not 0 <= o.reward_weight <= 1:
        raise ConfigError(
            f"Config value ovd.reward_weight={o.reward_weight} must be between 0 and 1 "
            "(the outcome reward's share; the verbal score gets the rest)."
        )
    for key in ("teacher_max_new_tokens",):
        value = getattr(o, key)
        if value is not None and value <= 0:
            raise ConfigError(f"Config value ovd.{key}={value} must be greater than 0.")
    if o.teacher_temperature is not None and o.teacher_temperature < 0:
        raise ConfigError(f"Config value ovd.teacher_temperature={o.teacher_temperature} must be 0 or more.")
    if o.score_prompt is not None:
        missing = [p for p in ("{problem}", "{response}") if p not in o.score_prompt]
        if missing:
            raise ConfigError(
                f"ovd.score_prompt must contain {' and '.join(missing)} (placeholders: {{problem}}, "
                "{response}, optionally {context}); the teacher cannot rate what it is not shown."
            )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-5", "lora.enabled=true"]`` into a nested dict."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"Override {item!r} is not of the form key=value (for example train.lr=1e-5)."
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"Override {item!r} has an empty key; write e.g. train.steps=10.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except _YAML_ERRORS:
            value = raw  # not a YAML scalar: the text itself
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r} conflicts with another override of {part!r}.")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Validate a plain dict (plus overrides) into a :class:`Config`."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"The config must be a mapping of keys to values, got {type(data).__name__}."
        )
    merged = _merge(data or {}, parse_overrides(overrides or []))
    cfg = _build(Config, merged, "")
    _check_ranges(cfg)
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (YAML would silently keep the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {_show(key)}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# What a YAML parse can raise besides YAMLError: bad timestamps (ValueError), deep nesting.
_YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and line."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"Config file {str(p)!r} does not exist. Check the path.")
    if not p.is_file():
        raise ConfigError(f"Config file {str(p)!r} is not a file. Check the path.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {str(p)!r} is not UTF-8 text.") from None
    except OSError as e:
        raise ConfigError(f"Config file {str(p)!r} cannot be read: {e.strerror or e}.") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"Config file {str(p)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}."
        ) from None
    except _YAML_ERRORS as e:
        raise ConfigError(f"Config file {str(p)!r} is not valid YAML: {_show(str(e), 200)}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {str(p)!r} must hold a mapping of keys to values, not a {type(data).__name__}."
        )
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (or start from defaults when None), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    return config_from_dict(data, overrides)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def as_config(config: Config | dict[str, Any] | str | Path, overrides: list[str] | None) -> Config:
    """A Config from a Config, a dict or a YAML path, with ``overrides`` applied."""
    if isinstance(config, Config):
        if overrides:
            return config_from_dict(config.to_dict(), overrides)
        return config
    if isinstance(config, dict):
        return config_from_dict(config, overrides)
    return load_config(config, overrides)
