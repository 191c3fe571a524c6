"""DivPrune (Alvar et al., CVPR 2025): max-min diversity of the projected tokens (method.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

from ..selection import select_tokens
from .base import ProjectorMethod, register_method


@register_method("divprune")
@dataclass
class DivPrune(ProjectorMethod):
    """DivPrune exactly as its official code: first the token farthest from its nearest neighbour, then
    ``argmax min_{j in P} (1 - cos)``."""

    def select(self, features, projected, k, *, projector):
        return select_tokens(projected, k, fusion="diversity")
