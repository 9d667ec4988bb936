"""Share a trained model on the Hugging Face hub, with a model card made from its run folder.

:func:`model_card` writes a ``README.md`` for a run's ``final/`` model from what the run folder
already holds: ``config.yaml`` (base model, method, objective, context, training settings) and
``metrics.jsonl`` (the first and last evaluation without the context, and the in-context
reference). :func:`push` writes that card into ``final/`` and uploads the folder with
``huggingface_hub`` (a transformers dependency). It runs at the end of ``opcd train`` when
``run.push_to_hub`` is set (:func:`push_after_training`, main process only) and from
``opcd push RUN_DIR [REPO_ID]``. Every hub failure (no token, no network, no permission) is a
:class:`~opcd.errors.HubError` that says the model is safe in ``final/`` and how to push it
later; nothing here touches the weights.

The card quotes the start of the context: keep the repo private (``run.hub_private``, the
default) when the context is not meant to be public.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opcd.config import Config, check_repo_id, load_config
from opcd.errors import HubError, OpcdError, RunFolderError

CARD_NAME = "README.md"
CONTEXT_CHARS = 300
"""How much of the context the card quotes."""
TAGS = ("opcd", "context-distillation")

_HOW = {
    "opcd": "trained on its own answers (without the context) to match the teacher's next-token "
            "distributions given the context",
    "ovd": "trained on its own answers (without the context), rated 0-9 by a teacher that sees "
           "the context",
    "offpolicy": "trained (without the context) on answers the teacher wrote given the context",
}
_TEACHERS = {"frozen": "the initial model (frozen)", "live": "the current model (live)"}


# --------------------------------------------------------------------------- reading the run
def _load_run(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunFolderError(
            f"{str(run_dir)!r} is not an opcd run folder (no config.yaml). Pass the folder "
            "`opcd train` wrote (its run.dir), which holds config.yaml, metrics.jsonl and final/."
        )
    return load_config(path)


def _final_dir(run_dir: Path) -> Path:
    final = run_dir / "final"
    if not final.is_dir():
        raise RunFolderError(
            f"The run folder {str(run_dir)!r} has no final/ model yet (an unfinished run?). "
            f"Finish it with `opcd train {run_dir / 'config.yaml'} --resume`, then push."
        )
    return final


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    """The ``eval`` records of ``metrics.jsonl`` in file order ([] without the file);
    unreadable lines are skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("type") == "eval" and isinstance(rec.get("score"), (int, float)):
            out.append(rec)
    return out


def run_context(cfg: Config) -> str | None:
    """The context the run distilled (the task-wide one), or None when it cannot be read back
    (a moved prompts or context file) or the task has none."""
    from opcd.tasks import build_task
    from opcd.tasks.chat import task_context

    try:
        return task_context(build_task(cfg.task))
    except OpcdError:
        return cfg.task.context


def hub_base_model(ref: str) -> str | None:
    """The hub repo id of a base model reference: a packaged model's upstream repo, a hub id
    itself; None for local folders and GGUF files."""
    from opcd.models.load import _HUB_ID
    from opcd.models.registry import REGISTRY

    if ref in REGISTRY:
        return REGISTRY[ref].upstream
    if _HUB_ID.match(ref) and not Path(ref).expanduser().exists():
        return ref
    return None


# --------------------------------------------------------------------------- the card
def _fmt(value: Any, err: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.3f} ± {err:.3f}" if isinstance(err, (int, float)) else f"{value:.3f}"


def _results(evals: list[dict[str, Any]]) -> list[str]:
    own = [r for r in evals if not r.get("with_context")]
    ref = [r for r in evals if r.get("with_context")]
    if not own and not ref:
        return ["No evaluation was recorded in metrics.jsonl."]
    rows: list[tuple[str, dict[str, Any]]] = []
    if own:
        rows.append(("before training, without the context", own[0]))
    if len(own) > 1:
        rows.append(("after training, without the context", own[-1]))
    if ref:
        rows.append(("before training, with the context (reference)", ref[0]))
    lines = ["| model | step | score | quality (nats/token) | n |", "|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r.get('step', '-')} | {_fmt(r['score'], r.get('stderr'))} | "
                     f"{_fmt(r.get('quality'), r.get('quality_stderr'))} | {r.get('n', '-')} |")
    lines += ["", "Score: the task's held-out metric (mean ± standard error over n prompts). "
              "Quality: how natural the base model, given the context, finds the answers, in nats "
              "per token (about 0: answers it would write itself; lower is worse)."]
    return lines


def _objective(cfg: Config) -> str:
    if cfg.method == "ovd":
        return "clipped policy gradient on the teacher's verbal scores"
    if cfg.method == "offpolicy":
        return f"{cfg.offpolicy.loss} on the teacher's own samples (off-policy)"
    return f"{cfg.loss.objective} over the top-{cfg.loss.top_k} tokens (on-policy)"


def _teacher(cfg: Config) -> str:
    t = cfg.teacher
    if t.mode in _TEACHERS:
        return _TEACHERS[t.mode]
    return f"`{t.model if t.mode == 'model' else t.server_model}` ({t.mode})"


def _quote(text: str) -> str:
    cut = text if len(text) <= CONTEXT_CHARS else text[:CONTEXT_CHARS].rstrip() + " …"
    return "\n".join("> " + line if line else ">" for line in cut.splitlines())


def model_card(run_dir: str | Path, repo_id: str | None = None) -> str:
    """The ``README.md`` (YAML front matter and markdown) for ``run_dir``'s ``final/`` model."""
    run = Path(run_dir)
    cfg = _load_run(run)
    evals = read_evals(run)
    base = hub_base_model(cfg.model)
    front = ["---"] + ([f"base_model: {base}"] if base else [])
    front += ["tags:", *(f"- {t}" for t in TAGS), "library_name: transformers", "---", ""]
    context = run_context(cfg)
    lora = (f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} (merged into the weights)"
            if cfg.lora.enabled else "full fine-tuning")
    body = [
        f"# {run.resolve().name}",
        "",
        f"`{cfg.model}` with a context distilled into its weights by opcd (On-Policy Context "
        f"Distillation, method `{cfg.method}`): it was {_HOW[cfg.method]}, so it now behaves "
        "as if the context were in its prompt without it being there.",
        "",
        "## Context",
        "",
        *([f"Task `{cfg.task.name}`; the context (first {CONTEXT_CHARS} characters):", "",
           _quote(context)] if context else [f"Task `{cfg.task.name}` (per-example contexts)."]),
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{cfg.model}` |",
        f"| method | {cfg.method} |",
        f"| objective | {_objective(cfg)} |",
        f"| teacher | {_teacher(cfg)} |",
        f"| steps | {cfg.train.steps} |",
        f"| batch | {cfg.train.batch_size} prompts x {cfg.rollout.n} responses |",
        f"| learning rate | {cfg.train.lr:g} |",
        f"| weights | {lora} |",
        f"| responses | at most {cfg.rollout.max_new_tokens} tokens, temperature "
        f"{cfg.rollout.temperature:g} |",
        "",
        f"## Results (task `{cfg.task.name}`, held-out prompts)",
        "",
        *_results(evals),
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id or "path/to/final"}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id or "path/to/final"}")',
        "```",
        "",
        "Chat with the model without the context: the distilled behaviour should show anyway.",
        "",
    ]
    return "\n".join(front + body)


# --------------------------------------------------------------------------- pushing
def _default_api() -> Any:
    from huggingface_hub import HfApi

    return HfApi()


def _failed(run_dir: Path, final: Path, repo_id: str, error: BaseException) -> HubError:
    return HubError(
        f"Could not push {str(final)!r} to the Hugging Face hub repo {repo_id!r}: "
        f"{type(error).__name__}: {error}. The trained model is saved locally in {str(final)!r} "
        f"(with its model card {CARD_NAME}). Log in (`hf auth login`, or set HF_TOKEN to a token "
        f"with write access), check the network, then push it with "
        f"`opcd push {run_dir} {repo_id}`."
    )


def push(run_dir: str | Path, repo_id: str | None = None, private: bool | None = None,
         api: Any = None) -> str:
    """Write the model card into ``run_dir/final`` and upload ``final/`` to ``repo_id``;
    returns the repo's URL.

    ``repo_id`` / ``private`` default to the run's ``run.push_to_hub`` / ``run.hub_private``
    (``private`` only applies when the repo is created). ``api``: an ``HfApi``-like object
    (default: a new ``huggingface_hub.HfApi``). Raises :class:`HubError` when the hub fails.
    """
    run = Path(run_dir)
    cfg = _load_run(run)
    final = _final_dir(run)
    repo = repo_id or cfg.run.push_to_hub
    if not repo:
        raise RunFolderError(
            f"No repo to push {str(run)!r} to: pass one (`opcd push {run} user/name`) or set "
            "run.push_to_hub in the run's config."
        )
    check_repo_id(repo, "The repo id")
    keep_private = cfg.run.hub_private if private is None else private
    from opcd.runtime.checkpoint import atomic_write_text

    atomic_write_text(final / CARD_NAME, model_card(run, repo))
    try:
        hub = api if api is not None else _default_api()
        hub.create_repo(repo, private=keep_private, exist_ok=True, repo_type="model")
        hub.upload_folder(repo_id=repo, folder_path=str(final), repo_type="model",
                          commit_message=f"opcd: upload {run.resolve().name}")
    except Exception as error:  # any hub / network / auth failure: the model stays in final/
        raise _failed(run, final, repo, error) from error
    return f"https://huggingface.co/{repo}"


def push_after_training(run_dir: Path, repo_id: str, private: bool,
                        say: Callable[[str], None]) -> str | None:
    """``run.push_to_hub`` at the end of ``opcd train``: push, and report either way through
    ``say``; a failure is reported, not raised (the trained model is already saved)."""
    try:
        url = push(run_dir, repo_id, private)
    except Exception as error:  # never lose a finished run to its upload
        failure = error if isinstance(error, OpcdError) else _failed(
            run_dir, run_dir / "final", repo_id, error)
        say(f"warning: {failure}")
        return None
    say(f"pushed {run_dir / 'final'} to {url}")
    return url
