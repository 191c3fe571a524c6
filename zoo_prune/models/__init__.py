"""Pruning inside Hugging Face VLMs: :func:`apply_pruning` and one module per model family."""

from . import llava, llava_next, qwen2_5_vl  # noqa: F401  (register the families)
from .common import PruningHandle, apply_pruning

__all__ = ["PruningHandle", "apply_pruning"]
