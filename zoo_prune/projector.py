"""What the estimators need to know about a multimodal projector M, computed once per model.

* :func:`mlp_parts` recognises M = Linear2 o act o Linear1 (LLaVA's ``multi_modal_projector``, an
  ``nn.Sequential(Linear, GELU, Linear)``) and returns its weights in the estimator's dtype.
* :func:`lowrank_parts` are the truncated SVD factors of those weights (method.md section 1, ``lowrank``).
* :func:`jacobian_gram` is the d_h x d_h matrix (W1 W1^T) o (W2^T W2) of the closed-form estimator.
* :class:`GroupedProjector` presents a projector that merges groups of rows (Qwen2.5-VL's merger:
  4 patches -> 1 token) as a per-token map, so that a "token" is what reaches the language model.

Everything here is cached per module in a weak dictionary and rebuilt when any parameter of the
module is replaced or changed in place (tracked by storage pointer and version counter).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _weights_signature(module: nn.Module) -> tuple:
    signature = []
    for tensor in list(module.parameters()) + list(module.buffers()):
        try:
            version = tensor._version
        except RuntimeError:  # inference tensors have no version counter
            version = None
        signature.append((tensor.data_ptr(), version, tensor.dtype, tensor.device, tuple(tensor.shape)))
    return tuple(signature)


def cached(module: nn.Module, key: tuple, build: Callable[[], object]):
    """``build()`` once per (module, key) for as long as the module's weights stay the same."""
    entries = _CACHE.setdefault(module, {})
    signature = _weights_signature(module)
    hit = entries.get(key)
    if hit is not None and hit[0] == signature:
        return hit[1]
    with torch.no_grad():
        value = build()
    entries[key] = (signature, value)
    return value


def upcast_state(module: nn.Module, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Parameters and buffers of ``module`` in ``dtype`` on ``device`` (for ``torch.func.functional_call``)."""

    def build():
        state = dict(module.named_parameters())
        state.update(module.named_buffers())
        return {
            name: (t.detach().to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device))
            for name, t in state.items()
        }

    return cached(module, ("state", dtype, str(device)), build)


@dataclass(frozen=True)
class MLPParts:
    """M(x) = W2 act(W1 x + b1) + b2, with weights in the estimator's dtype."""

    w1: Tensor  # (d_h, d_v)
    b1: Tensor | None  # (d_h,)
    act: nn.Module
    w2: Tensor  # (d_l, d_h)

    @property
    def in_features(self) -> int:
        return self.w1.shape[1]

    def linear(self, t: Tensor) -> Tensor:
        """W1 t, the first layer without its bias."""
        return t @ self.w1.T

    def pre_activation(self, x: Tensor) -> Tensor:
        """a = W1 x + b1."""
        return self.linear(x) if self.b1 is None else self.linear(x) + self.b1

    @property
    def norm_matrix(self) -> Tensor:
        """A matrix with the second layer's norm on activation differences: W2 itself."""
        return self.w2


def _describe(module: nn.Module) -> str:
    children = ", ".join(f"{name}: {type(child).__name__}" for name, child in module.named_children())
    return f"{type(module).__name__}({children})"


def _find_mlp_layers(projector: nn.Module, estimator: str) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    children = list(projector.children())
    unsupported = TypeError(
        f"estimator={estimator!r} needs a Linear-activation-Linear projector (as LLaVA's "
        f"multi_modal_projector); got {_describe(projector)}. Use estimator='naive', which works "
        f"for any projector."
    )
    if len(children) != 3:
        raise unsupported
    first, act, second = children
    if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)) or isinstance(act, nn.Linear):
        raise unsupported
    if first.out_features != second.in_features:
        raise unsupported
    # The children could be wired differently in forward(): check the composition on a probe, and
    # that the activation is elementwise (commutes with a permutation of its input).
    weight = first.weight
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, first.in_features, generator=generator).to(weight.device, weight.dtype)
    with torch.no_grad():
        hidden = first(probe)
        flipped = act(hidden.flip(-1)).flip(-1)
        composed = second(act(hidden))
        direct = projector(probe)
    tolerance = dict(rtol=1e-2, atol=1e-2) if weight.dtype in (torch.float16, torch.bfloat16) else {}
    if direct.shape != composed.shape or not torch.allclose(direct, composed, **tolerance):
        raise unsupported
    if not torch.allclose(flipped, act(hidden), **tolerance):
        raise TypeError(f"estimator={estimator!r} needs an elementwise activation; {_describe(projector)} has {act!r}")
    return first, act, second


def mlp_parts(projector: nn.Module, estimator: str, dtype: torch.dtype, device: torch.device) -> MLPParts:
    """The Linear-act-Linear weights of ``projector`` in ``dtype``; a clear error for any other form."""

    def build():
        first, act, second = _find_mlp_layers(projector, estimator)
        cast = lambda t: None if t is None else t.detach().to(device=device, dtype=dtype)  # noqa: E731
        return MLPParts(cast(first.weight), cast(first.bias), act, cast(second.weight))

    # One cache entry for every estimator: ``estimator`` only names the caller in the error.
    return cached(projector, ("mlp", dtype, str(device)), build)


@dataclass(frozen=True)
class LowRankMLPParts:
    """Rank-r factors W1 ~ A1 B1 (A1 = U1 S1, B1 = V1^T) and, for the second layer, only what its
    norm needs: ||U2 S2 V2^T d|| = ||S2 V2^T d|| because U2 has orthonormal columns."""

    a1: Tensor  # (d_h, r)
    b1_factor: Tensor  # (r, d_v)
    b1: Tensor | None
    act: nn.Module
    norm2: Tensor  # (r, d_h) = S2 V2^T

    @property
    def in_features(self) -> int:
        return self.b1_factor.shape[1]

    def linear(self, t: Tensor) -> Tensor:
        """A1 B1 t, the rank-r first layer without its bias."""
        return (t @ self.b1_factor.T) @ self.a1.T

    pre_activation = MLPParts.pre_activation

    @property
    def norm_matrix(self) -> Tensor:
        """S2 V2^T: the rank-r second layer's norm on activation differences."""
        return self.norm2


def truncated_svd(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """U_r, S_r, V_r^T of ``weight``, rank clipped to min(weight.shape)."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    r = min(rank, s.shape[0])
    return u[:, :r], s[:r], vh[:r]


def lowrank_parts(projector: nn.Module, rank: int, dtype: torch.dtype, device: torch.device) -> LowRankMLPParts:
    """Truncated SVD of rank ``rank`` of both linear layers, computed in ``dtype`` (float32 keeps the
    one-off cost of LLaVA's 4096 x 4096 layer near 10 s and 0.5 GiB on a CPU; float64 doubles both)."""

    def build():
        full = mlp_parts(projector, "lowrank", dtype, device)
        u1, s1, vh1 = truncated_svd(full.w1, rank)
        _, s2, vh2 = truncated_svd(full.w2, rank)
        return LowRankMLPParts(u1 * s1, vh1, full.b1, full.act, s2[:, None] * vh2)

    return cached(projector, ("lowrank", rank, dtype, str(device)), build)


def jacobian_gram(projector: nn.Module, dtype: torch.dtype, device: torch.device) -> Tensor:
    """K = (W1 W1^T) o (W2^T W2), so that ||J_i||_F^2 = g_i^T K g_i with g_i = act'(W1 x_i + b1)."""

    def build():
        parts = mlp_parts(projector, "closed_form", dtype, device)
        return (parts.w1 @ parts.w1.T) * (parts.w2.T @ parts.w2)

    return cached(projector, ("gram", dtype, str(device)), build)


class GroupedProjector(nn.Module):
    """Per-token view of a projector that maps ``group`` consecutive rows of width c to one token.

    Qwen2.5-VL's merger normalises each patch (RMSNorm) and then projects each 2x2 group of patches,
    concatenated, to one language-model token. Wrapped here, a token's input is the (group * c)
    concatenation of its patches, so ``zo_sensitivity`` perturbs exactly what becomes one token.
    """

    def __init__(self, merger: nn.Module, group: int):
        super().__init__()
        self.merger = merger
        self.group = group

    def forward(self, tokens: Tensor) -> Tensor:
        rows = tokens.reshape(*tokens.shape[:-1], self.group, tokens.shape[-1] // self.group)
        merged = self.merger(rows.reshape(-1, rows.shape[-1]))
        return merged.reshape(*tokens.shape[:-1], merged.shape[-1])
