"""The few places where opcd's calls depend on the installed transformers version.

transformers 5.x renamed the forward keyword and output field ``past_key_values`` to
``cache`` and ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``; the
old names still work there but warn (the cache one through transformers' logger). opcd
supports transformers >= 4.56, so every call site goes through these helpers, which use the
new names wherever the model takes them and the old ones elsewhere:

- :func:`cache_kwarg`: the keyword a module's ``forward`` takes the key/value cache under;
- :func:`output_cache`: the cache a model output returns;
- :func:`enable_activation_checkpointing`: activation (gradient) checkpointing on;
- :func:`quiet_library_warnings`: hides the deprecation warnings raised inside libraries
  that opcd's own calls cannot avoid (called once, by the command line).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command line imports this module before torch
    from torch import nn

NEW_CACHE = "cache"
OLD_CACHE = "past_key_values"


@functools.cache
def _library_cache_name() -> str:
    """The installed transformers' name, read from its own output classes."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    names = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    return NEW_CACHE if NEW_CACHE in names else OLD_CACHE


@functools.cache
def _forward_cache_name(cls: type[nn.Module]) -> str:
    try:
        params = set(inspect.signature(cls.forward).parameters)  # follows functools.wraps
    except (TypeError, ValueError):
        params = set()
    for name in (NEW_CACHE, OLD_CACHE):
        if name in params:
            return name
    # ``forward(*args, **kwargs)``: a wrapper passing everything to an installed model
    return _library_cache_name()


def cache_kwarg(module: nn.Module) -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword ``module.forward`` takes the cache under.

    Read once per module class from the signature of its ``forward`` (so a model written for
    an older transformers keeps its own name); for a ``**kwargs``-only wrapper, the name
    of the installed transformers.
    """
    return _forward_cache_name(type(module))


def output_cache(out: Any) -> Any:
    """The key/value cache a model output returns (``out.cache``, else ``out.past_key_values``)."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    return getattr(out, NEW_CACHE if NEW_CACHE in fields else OLD_CACHE)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint the activations of ``model`` (non-reentrant), under the installed API's name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# peft (0.21 at least) reads ``model.is_gradient_checkpointing`` in ``PeftModel.__init__``,
# i.e. on every ``get_peft_model``, whether checkpointing is on or not; transformers 5.x
# deprecated that property for ``is_activation_checkpointing``. The read is inside peft and
# nothing opcd passes avoids it: hide exactly that warning until peft reads the new name.
_LIBRARY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (
        "`is_gradient_checkpointing` is deprecated and will be removed in v6. "
        "Use `is_activation_checkpointing` instead.",
        FutureWarning,
    ),
)


def quiet_library_warnings() -> None:
    """Ignore the library-internal deprecation warnings listed above (exact messages), and
    transformers' per-load progress bars ("Loading weights", "Writing model shards"): opcd
    shows its own progress, and a bar per model load is noise in the terminal and in logs."""
    for message, category in _LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", category=category)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
