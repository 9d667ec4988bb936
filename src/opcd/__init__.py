"""opcd: On-Policy Context Distillation (arXiv 2602.12275).

Put what a language model does only with a context (a system prompt, experiential
knowledge, a hint) into its weights: the student samples its own answers without the
context, a teacher scores those tokens with it, and the student minimises the per-token
reverse KL to the teacher.

Python API (each CLI command is one of these):

    opcd.train(config, overrides)   # opcd train CONFIG.yaml key=value ...
    opcd.evaluate_model(model, task) # opcd eval --model ... --task ...
    opcd.demo()                      # opcd demo
    opcd.extract_experience(config)  # opcd extract CONFIG.yaml key=value ...
    opcd.compare(spec)               # opcd compare SPEC.yaml
    opcd.models.list_models(), opcd.models.pull(name)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "compare", "demo", "evaluate_model", "extract_experience", "load_config", "train"]


def __getattr__(name: str) -> Any:  # lazy: importing opcd must not import torch
    if name == "train":
        from opcd.training.loop import train

        return train
    if name == "evaluate_model":
        from opcd.api import evaluate_model

        return evaluate_model
    if name == "demo":
        from opcd.tools.demo import demo

        return demo
    if name == "extract_experience":
        from opcd.tools.experience import extract_experience

        return extract_experience
    if name == "compare":
        from opcd.eval.compare import compare

        return compare
    if name == "load_config":
        from opcd.config import load_config

        return load_config
    raise AttributeError(f"module 'opcd' has no attribute {name!r}")
