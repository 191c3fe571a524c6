"""FastV (Chen et al., ECCV 2024) as method.md section 4 fixes it: pruning inside the language model.

The decoder runs normally on the whole prompt up to layer K (K = 2). The visual tokens are ranked
by the attention that the last prompt token pays them, averaged over heads, in the K-th layer
(0-based index K - 1, the ``last_layer_attention`` of FastV's code); from layer K on (0-based) only
the top k visual tokens of each image and all text tokens remain: their hidden states, rotary
position embeddings (each token keeps its own position), attention-mask rows and columns and, in
the KV cache of those layers, their keys and values. Layers below K keep every token.

The mechanism is forward pre-hooks on the decoder layers, armed per prompt by ``apply_pruning``
(which knows where the images are) and reset whenever the language model starts a new sequence.
A cache entry per layer is what ``DynamicCache`` (the default) keeps; static or sliding-window
caches are not supported. The last attention row is computed from the layer's own projections and
rotary function, so it needs no eager attention.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..methods.base import LLMMethod, register_method


@register_method("fastv")
@dataclass
class FastV(LLMMethod):
    """FastV: keep the k visual tokens of each image most attended by the last token, from layer ``layer`` on."""

    layer: int = 2

    def __post_init__(self):
        check_int("layer", self.layer)

    def hooks(self, language_model: nn.Module, layers: nn.ModuleList) -> "FastVHooks":
        return FastVHooks(language_model, layers, self.layer)

    def llm_tokens(self, visual: int, keep: int, text: int, layers: int) -> list[int]:
        """Every token in layers 0 .. K-1, the kept ones from layer K on."""
        return [text + visual] * min(self.layer, layers) + [text + keep] * max(0, layers - self.layer)


def last_token_attention(attention: nn.Module, hidden: Tensor, position_embeddings, key_mask: Tensor | None) -> Tensor:
    """(B, L): softmax attention of the last query over all keys, averaged over heads, in float32.

    ``attention`` is a Llama-style module (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``); its
    model's ``apply_rotary_pos_emb`` rotates queries and keys; ``key_mask`` (B, L) hides padding.
    """
    batch, length, _ = hidden.shape
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    cos, sin = position_embeddings
    query = attention.q_proj(hidden[:, -1:]).view(batch, 1, -1, attention.head_dim).transpose(1, 2)
    keys = attention.k_proj(hidden).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    query = rotate(query, query, cos[:, -1:], sin[:, -1:])[0].float()
    keys = rotate(keys, keys, cos, sin)[1].float()
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)  # grouped-query attention
    scores = (query @ keys.transpose(-1, -2))[:, :, 0] * attention.scaling  # (B, H, L)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :].bool(), float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


class FastVHooks:
    """Forward hooks on a decoder stack that drop the unkept visual tokens from layer ``layer`` on.

    ``arm(images, length, key_mask)`` is called once per prompt with, for every image, its batch
    row, the columns of its visual tokens and its budget k. The next sequence that the language
    model starts (empty cache) is pruned if it has that length; ``kept_indices`` then lists, per
    image, the indices (into its visual tokens, sorted) of the kept ones.
    """

    def __init__(self, language_model: nn.Module, layers: nn.ModuleList, layer: int):
        if not 1 <= layer < len(layers):
            raise ValueError(f"FastV layer={layer} must lie in [1, {len(layers) - 1}] for a {len(layers)}-layer language model")
        self.armed = self.pending = None
        self.columns = None  # (B, L') prompt columns kept from layer K on, while a pruned sequence runs
        self.length = 0  # L, the prompt length of that sequence
        self.kept_indices = None
        self._handles = [language_model.register_forward_pre_hook(self._start, with_kwargs=True)]
        self._handles.append(layers[layer - 1].self_attn.register_forward_pre_hook(self._rank, with_kwargs=True))
        self._handles += [layers[i].register_forward_pre_hook(self._prune, with_kwargs=True) for i in range(layer, len(layers))]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def arm(self, images: list[tuple[int, Tensor, int]], length: int, key_mask: Tensor | None) -> None:
        self.armed = (images, length, key_mask)

    def _start(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() == 0:  # a new sequence: pruned only if it is the armed prompt
            self.pending, self.armed, self.columns = self.armed, None, None

    def _rank(self, module, args, kwargs):
        hidden = kwargs["hidden_states"]
        if self.pending is None or hidden.shape[1] != self.pending[1]:
            return
        images, length, key_mask = self.pending
        self.pending = None
        attention = last_token_attention(module, hidden, kwargs["position_embeddings"], key_mask)
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        kept_indices = []
        for row, columns, k in images:
            columns = columns.to(hidden.device)
            top = attention[row, columns].topk(k).indices.sort().values
            keep[row, columns] = False
            keep[row, columns[top]] = True
            kept_indices.append(top)
        lengths = keep.sum(dim=1)
        if bool((lengths != lengths[0]).any()):
            raise ValueError(
                f"FastV would keep {lengths.tolist()} tokens in the rows of this batch; rows must keep the same "
                f"number (images with as many visual tokens), or run them one by one"
            )
        self.kept_indices, self.length = kept_indices, length
        self.columns = keep.nonzero()[:, 1].view(hidden.shape[0], -1)

    def _prune(self, module, args, kwargs):
        if self.columns is None:
            return None
        kept, batch = self.columns, self.columns.shape[0]
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cos, sin = kwargs["position_embeddings"]
        prefill = cos.shape[-2] == self.length
        if prefill:  # layer K gets all L tokens; every layer from K on gets the full positions and mask
            kwargs["position_embeddings"] = (_gather(cos, kept, 1), _gather(sin, kept, 1))
            if isinstance(kwargs.get("position_ids"), Tensor):
                kwargs["position_ids"] = _gather(kwargs["position_ids"], kept, -1)
            if hidden.shape[1] == self.length:
                hidden = _gather(hidden, kept, 1)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor):  # keys: kept prompt columns, then every generated token
            generated = torch.arange(self.length, mask.shape[-1], device=kept.device).expand(batch, -1)
            mask = _gather(mask, torch.cat([kept, generated], dim=1), -1)
            if prefill and mask.dim() == 4:
                mask = _gather(mask, kept, -2)
            kwargs["attention_mask"] = mask
        return (hidden, *args[1:]), kwargs


def _gather(tensor: Tensor, index: Tensor, dim: int) -> Tensor:
    """``tensor`` (batch first, possibly broadcast over it) taken at ``index`` (B, n) along ``dim``."""
    dim, index = dim % tensor.dim(), index.to(tensor.device)
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    view = [index.shape[0]] + [1] * (tensor.dim() - 1)
    view[dim] = index.shape[1]
    size = list(tensor.shape)
    size[dim] = index.shape[1]
    return tensor.gather(dim, index.view(view).expand(size))
