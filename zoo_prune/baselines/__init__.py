"""Baselines that act inside a model rather than on projected tokens: VisionZip (vision tower) and
FastV (language model). Importing this package registers ``visionzip`` and ``fastv`` as methods."""

from .fastv import FastV, FastVHooks, last_token_attention
from .visionzip import VisionZip, record_cls_attention, visionzip_tokens

__all__ = ["FastV", "FastVHooks", "VisionZip", "last_token_attention", "record_cls_attention", "visionzip_tokens"]
