"""Baselines that act inside a model rather than on projected tokens: VisionZip (vision tower),
FastV and SparseVLM (language model, on the shared mechanics of ``llm_pruning``). Importing this
package registers ``visionzip``, ``fastv`` and ``sparsevlm`` as methods."""

from .fastv import FastV, FastVHooks
from .llm_pruning import DecoderPruning, attention_rows, last_token_attention
from .sparsevlm import SparseVLM, SparseVLMHooks, density_peak_merge
from .visionzip import VisionZip, record_cls_attention, visionzip_tokens

__all__ = [
    "DecoderPruning", "FastV", "FastVHooks", "SparseVLM", "SparseVLMHooks", "VisionZip", "attention_rows",
    "density_peak_merge", "last_token_attention", "record_cls_attention", "visionzip_tokens",
]
