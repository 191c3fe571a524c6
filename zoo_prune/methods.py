"""Registry of pruning methods by name, so that params.yaml, the CLI and lmms-eval pick one by a string.

A method chooses which k of the N visual tokens reach the language model, from the vision
features X (the projector's input), the projected tokens Z = M(X) and the projector M:

    method = get_method("zoo", m=64, h=0.01)
    keep = method.select(features, projected, k, projector=projector)   # (k,) or (B, k), selection order

Registered here: ``zoo`` (ZOO-Prune, Algorithm 1), ``sum_fusion``, ``sensitivity_only``
(Table 5), ``divprune`` (Alvar et al., 2025) and ``random`` (a control). A method is a dataclass whose
fields are its options; register your own with :func:`register_method`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from ._checks import check_choice, check_int, check_positive_float
from .selection import select_tokens
from .sensitivity import DEFAULT_H, DEFAULT_M, DEFAULT_RANK, ESTIMATORS, zo_sensitivity
from .projector import mlp_parts

_REGISTRY: dict[str, type["PruningMethod"]] = {}


def register_method(name: str):
    """Class decorator: make a :class:`PruningMethod` dataclass available as ``get_method(name)``."""

    def decorate(cls):
        if name in _REGISTRY:
            raise ValueError(f"a pruning method named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str, **options) -> "PruningMethod":
    """An instance of the method registered as ``name``, configured by ``options``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(available_methods())}")
    cls = _REGISTRY[name]
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise TypeError(f"pruning method {name!r} has no option {', '.join(map(repr, unknown))}; its options: {allowed}")
    return cls(**options)


@dataclass
class PruningMethod:
    """Base class: ``select`` returns the indices of the kept tokens in selection order.

    ``stage`` says where the method acts inside a model (``zoo_prune.apply_pruning``):
    ``"projector"`` selects among the projector's outputs before the language model (``select``),
    ``"vision"`` inside the vision tower (VisionZip), ``"llm"`` inside the language model (FastV).
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "projector"

    def llm_tokens(self, visual: int, keep: int, text: int, layers: int) -> list[int]:
        """Tokens entering each of the ``layers`` decoder layers in a prefill of one image of ``visual``
        tokens pruned to ``keep``, with ``text`` text tokens (what the FLOPs ledger counts). Methods
        that prune before the language model: ``text + keep`` at every layer."""
        return [text + keep] * layers

    def select(self, features: Tensor, projected: Tensor, k: int, *, projector: nn.Module) -> Tensor:
        raise NotImplementedError(
            f"pruning method {self.name!r} acts at stage {self.stage!r}, not on projected tokens; "
            f"use zoo_prune.apply_pruning(model, method={self.name!r})"
        )


@register_method("divprune")
@dataclass
class DivPrune(PruningMethod):
    """DivPrune (Alvar et al., CVPR 2025): max-min diversity of the projected tokens."""

    def select(self, features, projected, k, *, projector):
        return select_tokens(projected, k, fusion="diversity")


@register_method("random")
@dataclass
class RandomPrune(PruningMethod):
    """k tokens uniformly at random; ``seed=None`` draws from torch's global generator."""

    seed: int | None = 0

    def select(self, features, projected, k, *, projector):
        return select_tokens(projected, k, fusion="random", seed=self.seed)


@register_method("zoo")
@dataclass
class ZOOPrune(PruningMethod):
    """ZOO-Prune (Algorithm 1): zeroth-order sensitivity at the projector times diversity (Eq. 5).

    ``estimator="auto"`` uses ``fused`` (exact, same values as ``naive``) when the projector is
    Linear-act-Linear and ``naive`` otherwise. ``seed`` fixes the directions (None: global RNG).
    """

    m: int = DEFAULT_M
    h: float = DEFAULT_H
    estimator: str = "auto"
    rank: int = DEFAULT_RANK
    seed: int | None = 0
    fusion: ClassVar[str] = "multiply"

    def __post_init__(self):
        check_int("m", self.m)
        check_positive_float("h", self.h)
        check_choice("estimator", self.estimator, ("auto",) + ESTIMATORS)
        check_int("rank", self.rank)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)

    def resolve_estimator(self, projector: nn.Module) -> str:
        if self.estimator != "auto":
            return self.estimator
        try:
            parameter = next(projector.parameters())
            mlp_parts(projector, "fused", parameter.dtype, parameter.device)
        except (TypeError, StopIteration):
            return "naive"
        return "fused"

    def sensitivity(self, features: Tensor, projector: nn.Module) -> Tensor:
        return zo_sensitivity(
            projector, features, m=self.m, h=self.h, seed=self.seed,
            estimator=self.resolve_estimator(projector), rank=self.rank,
        )

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
