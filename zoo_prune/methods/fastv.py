"""FastV (Chen et al., ECCV 2024) as method.md section 4 fixes it: pruning inside the language model.

The decoder runs normally on the whole prompt up to layer K (K = 2). The visual tokens are ranked
by the attention that the last prompt token pays them, averaged over heads, in the K-th layer
(0-based index K - 1, the ``last_layer_attention`` of FastV's code); from layer K on (0-based) only
the top k visual tokens of each image and all text tokens remain: their hidden states, rotary
position embeddings (each token keeps its own position), attention-mask rows and columns and, in
the KV cache of those layers, their keys and values. Layers below K keep every token.

The mechanism is :class:`~zoo_prune.methods.llm_pruning.DecoderPruning`, forward pre-hooks on
the decoder layers armed per prompt by ``apply_pruning``: only the last prompt token's attention
row in layer K - 1 is computed, from the layer's own projections and rotary function, so the model
keeps its attention implementation (SDPA or eager). Rows of a batch whose images keep different
numbers of tokens (Qwen2.5-VL or LLaVA-NeXT images of different sizes) are padded with empty slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_int
from .base import LLMMethod, register_method
from .llm_pruning import Decision, DecoderPruning


@register_method("fastv")
@dataclass
class FastV(LLMMethod):
    """FastV: keep the k visual tokens of each image most attended by the last token, from layer ``layer`` on."""

    layer: int = 2

    def __post_init__(self):
        check_int("layer", self.layer)

    def llm_tokens(self, visual: int, keep: int, text: int, layers: int) -> list[int]:
        """Every token in layers 0 .. K-1, the kept ones from layer K on."""
        return [text + visual] * min(self.layer, layers) + [text + keep] * max(0, layers - self.layer)

    def hooks(self, language_model: nn.Module, layers: nn.ModuleList) -> "FastVHooks":
        """The hooks that prune inside ``language_model`` (its decoder ``layers``), armed per prompt."""
        return FastVHooks(language_model, layers, self.layer)


class FastVHooks(DecoderPruning):
    """Forward hooks on a decoder stack that drop the unkept visual tokens from layer ``layer`` on.

    ``arm(images, length, key_mask)`` is called once per prompt with, for every image, its batch
    row, the columns of its visual tokens and its budget k (see :class:`DecoderPruning`, which
    also pads the rows of a batch that keep different numbers of tokens); ``kept_indices`` then
    lists, per image, the indices (into its visual tokens, sorted) of the kept ones.
    """

    def __init__(self, language_model: nn.Module, layers: nn.ModuleList, layer: int):
        if not 1 <= layer < len(layers):
            raise ValueError(f"FastV layer={layer} must lie in [1, {len(layers) - 1}] for a {len(layers)}-layer language model")
        super().__init__(language_model, layers, [layer - 1])

    def choose(self, stage, attention, hidden, position_embeddings):
        last = torch.full((hidden.shape[0], 1), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
        scores = self.rows(attention, hidden, position_embeddings, last)[:, 0]
        decisions = []
        for i, (row, _, k) in enumerate(self.images):
            attended = scores[row, self.visual_slots(i).to(scores.device)]
            decisions.append(Decision(attended.topk(min(k, len(attended))).indices.sort().values))
        return decisions
