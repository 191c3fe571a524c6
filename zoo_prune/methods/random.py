"""Random pruning: the control every pruning table carries (method.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._checks import check_int
from ..selection import select_tokens
from .base import ProjectorMethod, register_method


@register_method("random")
@dataclass
class RandomPrune(ProjectorMethod):
    """k tokens uniformly at random; ``seed=None`` draws from torch's global generator. A batch shares
    one draw, so an image's tokens do not depend on its batch."""

    seed: int | None = 0
    params_section: ClassVar[str] = "baselines"

    def __post_init__(self):
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)

    def select(self, features, projected, k, *, projector):
        return select_tokens(projected, k, fusion="random", seed=self.seed)
