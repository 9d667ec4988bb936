"""Shared fixtures: a tiny random chat model (built from a config, no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def sum_tolerance(term_scale: float, ulps: float = 64.0) -> float:
    """Absolute tolerance for two float32 computations of a mean of per-token divergences
    that differ only in summation order (processes, micro-batches, padding).

    Each token's divergence sums terms of magnitude up to ``term_scale`` (about the
    entropy, in nats) that cancel to a value that may be far smaller: the rounding error is
    set by the terms, not by the result, so a relative tolerance on a loss of order 1e-7 is
    meaningless. ``ulps`` float32 epsilons of the terms' scale.
    """
    return ulps * FLOAT32_EPS * (abs(term_scale) + 1.0)


@pytest.fixture(autouse=True, scope="session")
def _probe_file_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """The decode probe (opcd.sampling.probe) writes its figures under the tests' tmp dir, not the
    user's cache (the packaged models stay read from there)."""
    from opcd.sampling import probe

    path = tmp_path_factory.mktemp("probe") / probe.PROBE_FILE
    mp = pytest.MonkeyPatch()
    mp.setattr(probe, "_probe_path", lambda: path)
    yield path
    mp.undo()

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Always answer in French. Toujours répondre en français.",
    "What is the capital of Italy? The capital of Italy is Rome.",
    "La capitale de l'Italie est Rome. Bonjour, comment allez-vous?",
    "Explain how a rainbow forms in one sentence.",
    "system user assistant hello world question answer",
] * 4


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, chat_template=CHATML, padding_side="left",
    )


def build_tiny_model(vocab_size: int, seed: int = 0, tie: bool = False, hidden_size: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, eos_token_id=2, pad_token_id=0, bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


def save_tiny(path: Path, seed: int = 0, tie: bool = False) -> Path:
    tok = build_tokenizer()
    model = build_tiny_model(len(tok), seed=seed, tie=tie)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama with a ChatML byte-level BPE tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_dir_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and tokenizer, different random weights (a 'model' teacher)."""
    return save_tiny(tmp_path_factory.mktemp("tiny2") / "model", seed=1)


@pytest.fixture
def tiny(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    return model, tok
