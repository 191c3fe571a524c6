"""VisionZip (Yang et al., CVPR 2025) as method.md section 4 fixes it, on a CLIP-style vision tower.

In the vision encoder's layer -2 (the layer whose output LLaVA feeds its projector):

* dominant: the CLS token plus the D - 1 patch tokens with the largest CLS attention (the
  attention probabilities of the CLS query, summed over heads);
* contextual: C targets taken uniformly (step ``len // C``) among the remaining tokens; every other
  remaining token is merged into its most similar target by the cosine of its head-averaged key;
  a contextual token is the target plus the mean of the tokens merged into it.

The D + C tokens, dominant first in their original order then contextual, go through the
projector. LLaVA-1.5's (D, C) are 192 -> (162, 30), 128 -> (108, 20), 64 -> (54, 10): a fixed
dominant fraction of 27/32, the default here.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_float
from .base import VisionMethod, register_method

DOMINANT_FRACTION = 27 / 32


@register_method("visionzip")
@dataclass
class VisionZip(VisionMethod):
    """VisionZip: ``dominant_fraction`` of the k tokens are dominant (CLS included), the rest contextual."""

    dominant_fraction: float = DOMINANT_FRACTION

    def __post_init__(self):
        check_positive_float("dominant_fraction", self.dominant_fraction)
        if self.dominant_fraction > 1:
            raise ValueError(f"dominant_fraction must lie in (0, 1], got dominant_fraction={self.dominant_fraction}")

    def split(self, k: int) -> tuple[int, int]:
        """(D, C) with D + C = k and D >= 1 (the CLS token is always dominant)."""
        dominant = min(k, max(1, round(self.dominant_fraction * k)))
        return dominant, k - dominant

    def capture(self, attention: nn.Module):
        return record_cls_attention(attention)

    def merge(self, hidden: Tensor, record: dict, rows: list[int], k: int) -> tuple[Tensor, Tensor]:
        return visionzip_tokens(hidden, record["cls_attention"][rows], record["keys"][rows], *self.split(k))


def visionzip_tokens(hidden: Tensor, cls_attention: Tensor, keys: Tensor, dominant: int, contextual: int) -> tuple[Tensor, Tensor]:
    """The D + C VisionZip tokens of each image and the patch indices they come from.

    Args:
        hidden: (B, 1 + N, d), the layer's output, CLS first.
        cls_attention: (B, N), CLS attention to each patch token, summed over heads.
        keys: (B, 1 + N, d_k), the layer's keys averaged over heads.
        dominant, contextual: D (CLS included) and C.

    Returns:
        tokens (B, D + C, d): CLS, the D - 1 dominant patches in original order, then the C
        contextual tokens; patches (B, D - 1 + C): the dominant patch indices (0-based, CLS
        excluded, sorted) followed by the contextual targets' patch indices.
    """
    batch, n_patches = cls_attention.shape
    if dominant - 1 + contextual > n_patches:
        raise ValueError(f"VisionZip cannot keep {dominant} + {contextual} tokens from {n_patches} patches and CLS")
    top = cls_attention.topk(dominant - 1, dim=1).indices.sort(dim=1).values  # (B, D - 1)
    is_dominant = torch.zeros(batch, n_patches, dtype=torch.bool, device=hidden.device)
    is_dominant.scatter_(1, top, True)
    rest = (~is_dominant).nonzero()[:, 1].view(batch, -1)  # remaining patch indices in original order
    patches = hidden[:, 1:]
    dominant_tokens = torch.cat([hidden[:, :1], _take(patches, top)], dim=1)
    if contextual == 0:
        return dominant_tokens, top
    step = max(1, rest.shape[1] // contextual)
    is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=hidden.device)
    is_target[torch.arange(0, rest.shape[1], step, device=hidden.device)[:contextual]] = True
    targets, merged = rest[:, is_target], rest[:, ~is_target]
    unit_keys = F.normalize(keys[:, 1:].float(), dim=-1)
    similarity = _take(unit_keys, merged) @ _take(unit_keys, targets).transpose(1, 2)  # (B, merged, C)
    assign = F.one_hot(similarity.argmax(dim=2), contextual).to(hidden.dtype)  # (B, merged, C)
    counts = assign.sum(dim=1).clamp(min=1)[..., None]
    merged_mean = assign.transpose(1, 2) @ _take(patches, merged) / counts
    contextual_tokens = _take(patches, targets) + merged_mean
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), torch.cat([top, targets], dim=1)


def _take(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens[b, index[b]] for every b: (B, n, d), (B, m) -> (B, m, d)."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


@contextmanager
def record_cls_attention(attention: nn.Module):
    """Record, while active, the CLS attention (summed over heads) and head-averaged keys of a
    CLIP-style attention module (``q_proj``, ``k_proj``, ``num_heads``, ``scale``), computed from its
    input exactly as eager attention would, whatever attention implementation the tower runs."""
    record = {}

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch, length, _ = hidden.shape
        query = module.q_proj(hidden[:, :1]).view(batch, 1, module.num_heads, -1).transpose(1, 2).float()
        keys = module.k_proj(hidden).view(batch, length, module.num_heads, -1).transpose(1, 2).float()
        probabilities = (query @ keys.transpose(-1, -2) * module.scale).softmax(dim=-1)  # (B, H, 1, 1 + N)
        record["cls_attention"] = probabilities.sum(dim=1)[:, 0, 1:]
        record["keys"] = keys.mean(dim=1)

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()
