"""One adapter per model family (``adapter_for(model)``): the public API the wrapper, the stages, the
demo and the analysis use to reach a VLM's projector, its X and Z, placeholders and positions."""

from .base import ModelAdapter, Units, adapter_class, adapter_for, record_io, register_adapter, supported_models
from . import llava, llava_next, qwen2_5_vl  # noqa: E402,F401  (register the families)

__all__ = ["ModelAdapter", "Units", "adapter_class", "adapter_for", "record_io", "register_adapter", "supported_models"]
