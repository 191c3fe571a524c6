"""ZOO-Prune (Algorithm 1) and its Table-5 variants: zeroth-order sensitivity at the projector, fused
with the diversity of the projected tokens (method.md sections 1-2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .._checks import check_choice, check_int, check_positive_float
from ..selection import select_tokens
from ..sensitivity import DEFAULT_H, DEFAULT_M, DEFAULT_RANK, ESTIMATORS, resolve_estimator, zo_sensitivity
from .base import ProjectorMethod, register_method


@register_method("zoo")
@dataclass
class ZOOPrune(ProjectorMethod):
    """ZOO-Prune (Algorithm 1): zeroth-order sensitivity at the projector times diversity (Eq. 5).

    ``estimator="auto"`` (:func:`~zoo_prune.sensitivity.resolve_estimator`) uses ``fused`` (exact, same
    values as ``naive``) when the projector is Linear-act-Linear and ``naive`` otherwise; the paper's LLaVA-NeXT setting ``lowrank`` (rank 128)
    is asked for explicitly (params.yaml ``paper.models.llava-next-7b.estimator``). ``seed`` fixes
    the directions (None: torch's global generator).
    """

    m: int = DEFAULT_M
    h: float = DEFAULT_H
    estimator: str = "auto"
    rank: int = DEFAULT_RANK
    seed: int | None = 0
    fusion: ClassVar[str] = "multiply"
    params_section: ClassVar[str] = "zoo"

    def __post_init__(self):
        check_int("m", self.m)
        check_positive_float("h", self.h)
        check_choice("estimator", self.estimator, ("auto",) + ESTIMATORS)
        check_int("rank", self.rank)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)

    def resolve_estimator(self, projector: nn.Module) -> str:
        return resolve_estimator(projector, self.estimator)

    def sensitivity(self, features, projector: nn.Module):
        return zo_sensitivity(projector, features, m=self.m, h=self.h, seed=self.seed, estimator=self.estimator, rank=self.rank)

    def select(self, features, projected, k, *, projector):
        return select_tokens(projected, k, sensitivity=self.sensitivity(features, projector), fusion=self.fusion)


@register_method("sum_fusion")
@dataclass
class SumFusion(ZOOPrune):
    """Table 5 "Fusion (sum)": Score = S^ + Div."""

    fusion: ClassVar[str] = "sum"


@register_method("sensitivity_only")
@dataclass
class SensitivityOnly(ZOOPrune):
    """Table 5 "Sensitivity only": the k most sensitive tokens."""

    fusion: ClassVar[str] = "sensitivity"
