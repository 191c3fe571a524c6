"""Zeroth-order token sensitivity at the multimodal projector (paper Eq. 2-3, Algorithm 1 lines 3-8).

    delta_ij = (M(x_i + h u_j) - M(x_i - h u_j)) / 2h,      S(i) = (1/m) sum_j ||delta_ij||_2

with m unit directions u_j shared by all tokens of an image. By Proposition 3.1,
S(i) = E_u ||J_i u|| + O(h^2), J_i the Jacobian of M at x_i. Four estimators (method.md section 1):

* ``auto`` (the default): ``fused`` when the projector is Linear-act-Linear, else ``naive``: the
  same values either way (:func:`resolve_estimator`, the one home of this choice).
* ``naive``: Algorithm 1 literally, 2 N m projector calls (batched in chunks). Any projector.
* ``fused``: exact for M = W2 act(W1 x + b1) + b2. W1(x_i +- h u_j) + b1 = a_i +- h v_j, so
  a = W1 X + b1 and v = W1 U are computed once, and the second layer's bias cancels:
  delta_ij = W2 (act(a_i + h v_j) - act(a_i - h v_j)) / 2h. Same value as ``naive``.
* ``lowrank``: ``fused`` on the rank-``rank`` truncated SVD of both layers (the paper's LLaVA-NeXT
  setting); the second layer enters only through ||S2 V2^T d||, its U2 being orthonormal.
* ``closed_form``: the h -> 0, m -> infinity limit of the mean square:
  S_cf(i) = ||J_i||_F / sqrt(d_v) with ||J_i||_F^2 = g_i^T ((W1 W1^T) o (W2^T W2)) g_i,
  g_i = act'(a_i). Deterministic: no directions, no h.

All arithmetic is in float32 (float64 if the features or the projector are float64), whatever
the model's dtype: in bf16, x +- h u rounds back to x at h = 0.01 and the ranking is noise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_float_tensor, check_int, check_positive_float, compute_dtype
from .projector import jacobian_gram, lowrank_parts, mlp_parts, upcast_state

ESTIMATORS = ("naive", "fused", "lowrank", "closed_form")
DEFAULT_M = 64
DEFAULT_H = 0.01
DEFAULT_RANK = 128
# Elements of the widest intermediate of one chunk of tokens. Measured on a 2-core CPU at the
# LLaVA-1.5 shape: matmul-bound estimators (naive, fused) are fastest near 2^22, the elementwise-
# bound lowrank near 2^19 (its chunk then stays in cache). On a GPU larger chunks pay; 2^24 float32
# elements are 64 MiB per intermediate.
CHUNK_ELEMENTS_CPU = {"naive": 2**22, "fused": 2**22, "lowrank": 2**19}
CHUNK_ELEMENTS_GPU = 2**24


def resolve_estimator(projector: nn.Module, estimator: str = "auto") -> str:
    """``estimator``, with ``auto`` resolved: ``fused`` (exact, ~2.5x fewer FLOPs) for a
    Linear-act-Linear projector, ``naive`` for any other (e.g. Qwen2.5-VL's merger with its RMSNorm)."""
    check_choice("estimator", estimator, ("auto",) + ESTIMATORS)
    if estimator != "auto":
        return estimator
    try:
        parameter = next(projector.parameters())
        mlp_parts(projector, "fused", parameter.dtype, parameter.device)
    except (TypeError, StopIteration):
        return "naive"
    return "fused"


def draw_directions(m: int, dim: int, *, seed: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """m directions u_j ~ N(0, I_dim) normalised to unit rows, float32 on the CPU.

    With ``seed`` the draw is the same on every machine and device; with neither ``seed`` nor
    ``generator``, torch's global generator is used (``torch.manual_seed`` fixes it).
    """
    m = check_int("m", m)
    dim = check_int("dim", dim)
    if seed is not None:
        generator = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    directions = torch.randn(m, dim, generator=generator, dtype=torch.float32)
    return directions / directions.norm(dim=1, keepdim=True)


def zo_sensitivity(
    projector: nn.Module,
    features: Tensor,
    *,
    m: int | None = None,
    h: float = DEFAULT_H,
    directions: Tensor | None = None,
    seed: int | None = None,
    estimator: str = "auto",
    rank: int = DEFAULT_RANK,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Sensitivity S(i) of every visual token at ``projector`` (paper Eq. 3).

    Args:
        projector: the multimodal projector M, any ``nn.Module`` mapping (n, d_v) -> (n, d_l)
            (wrap Qwen2.5-VL's merger in :class:`~zoo_prune.projector.GroupedProjector`).
        features: X, (N, d_v) or (B, N, d_v): what the model feeds its projector.
        m: number of directions (default 64); taken from ``directions`` when those are given.
        h: finite-difference step (default 0.01).
        directions: (m, d_v) perturbation directions, normalised to unit rows here.
        seed: fixes the draw of directions (:func:`draw_directions`) when none are given.
            One set of directions serves every token and every image of a batch.
        estimator: ``auto`` (``fused`` where exact, else ``naive``), ``naive``, ``fused``, ``lowrank``
            or ``closed_form`` (module docstring).
        rank: rank of the truncated SVD for ``lowrank`` (the paper uses 128).
        chunk_tokens: tokens per chunk of work; by default sized for speed with bounded memory.

    Returns:
        S, shape (N,) or (B, N), float32 (float64 when computed in float64), on features' device.
    """
    if not isinstance(projector, nn.Module):
        raise TypeError(f"projector must be a torch.nn.Module, got {type(projector).__name__}")
    check_float_tensor("features", features, dims=(2, 3))
    estimator = resolve_estimator(projector, estimator)
    h = check_positive_float("h", h)
    rank = check_int("rank", rank)
    if chunk_tokens is not None:
        chunk_tokens = check_int("chunk_tokens", chunk_tokens)
    d_v = features.shape[-1]
    if features.shape[-2] == 0:
        raise ValueError(f"features hold no tokens (shape {tuple(features.shape)})")
    if directions is not None:
        check_float_tensor("directions", directions, dims=(2,))
        if directions.shape[1] != d_v:
            raise ValueError(
                f"directions have width {directions.shape[1]} but features have d_v={d_v} "
                f"(directions shape {tuple(directions.shape)}, features shape {tuple(features.shape)})"
            )
        if m is not None and m != directions.shape[0]:
            raise ValueError(f"m={m} disagrees with the {directions.shape[0]} rows of directions")
        if bool((directions.norm(dim=1) == 0).any()):
            raise ValueError("directions contain a zero row, which has no unit direction")
    m = check_int("m", DEFAULT_M if m is None else m)

    params = list(projector.parameters())
    dtype = compute_dtype(features.dtype, *(p.dtype for p in params))
    device = features.device
    x = features.reshape(-1, d_v).to(dtype)

    with torch.no_grad():
        if estimator == "closed_form":
            sensitivity = _closed_form(projector, x, dtype)
        else:
            if directions is None:
                directions = draw_directions(m, d_v, seed=seed)
            u = directions.to(device=device, dtype=dtype)
            u = u / u.norm(dim=1, keepdim=True)
            if estimator == "naive":
                sensitivity = _naive(projector, x, u, h, chunk_tokens)
            else:
                if estimator == "fused":
                    parts = mlp_parts(projector, estimator, dtype, device)
                else:
                    parts = lowrank_parts(projector, rank, dtype, device)
                _check_width(parts.in_features, d_v, projector)
                chunk = _chunk(chunk_tokens, m, max(parts.norm_matrix.shape), estimator, device)
                sensitivity = _mlp_finite_differences(parts, x, u, h, chunk)
    return sensitivity.reshape(features.shape[:-1])


def _check_width(expected: int, d_v: int, projector: nn.Module) -> None:
    if expected != d_v:
        raise ValueError(f"features have d_v={d_v} but {type(projector).__name__} expects inputs of width {expected}")


def _chunk(chunk_tokens: int | None, rows_per_token: int, width: int, estimator: str, device: torch.device) -> int:
    """Tokens per chunk: the requested number, or as many as keep (chunk, rows, width) near the target."""
    if chunk_tokens is not None:
        return chunk_tokens
    elements = CHUNK_ELEMENTS_CPU[estimator] if device.type == "cpu" else CHUNK_ELEMENTS_GPU
    return max(1, elements // (rows_per_token * width))


def _naive(projector: nn.Module, x: Tensor, u: Tensor, h: float, chunk_tokens: int | None) -> Tensor:
    """Algorithm 1 lines 5-8: project X + hU and X - hU, difference, norm, mean over directions."""
    n, d_v = x.shape
    m = u.shape[0]
    state = upcast_state(projector, x.dtype, x.device)
    call = lambda rows: torch.func.functional_call(projector, state, (rows,))  # noqa: E731
    try:
        probe = call(x[:1])
    except RuntimeError as error:
        raise ValueError(f"{type(projector).__name__} cannot project features of width d_v={d_v}: {error}") from error
    if probe.dim() != 2 or probe.shape[0] != 1:
        raise ValueError(
            f"{type(projector).__name__} mapped 1 token of width {d_v} to shape {tuple(probe.shape)}; a projector "
            f"must map (n, d_v) to (n, d_l) (wrap a merger of patch groups in GroupedProjector)"
        )
    chunk = _chunk(chunk_tokens, 2 * m, max(d_v, probe.shape[1]), "naive", x.device)
    step = h * u
    sensitivity = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        xs = x[start : start + chunk, None, :]  # (c, 1, d_v)
        c = xs.shape[0]
        perturbed = torch.cat([(xs + step).reshape(-1, d_v), (xs - step).reshape(-1, d_v)])
        z_plus, z_minus = call(perturbed).split(c * m)
        delta = (z_plus - z_minus) / (2 * h)  # (c m, d_l)
        sensitivity[start : start + c] = delta.reshape(c, m, -1).norm(dim=-1).mean(dim=1)
    return sensitivity


def _mlp_finite_differences(parts, x: Tensor, u: Tensor, h: float, chunk: int) -> Tensor:
    """Shared body of ``fused`` and ``lowrank`` (``parts`` is MLPParts or LowRankMLPParts):
    ||N (act(a + h v) - act(a - h v))|| / 2h with a = W1 x + b1, v = W1 u and N ``parts.norm_matrix``,
    which has the second layer's norm on the activation difference (W2 itself, or S2 V2^T).
    """
    n = x.shape[0]
    a = parts.pre_activation(x)
    v = h * parts.linear(u)  # (m, d_h)
    norm_matrix = parts.norm_matrix
    sensitivity = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        ac = a[start : start + chunk, None, :]  # (c, 1, d_h)
        difference = parts.act(ac + v) - parts.act(ac - v)  # (c, m, d_h)
        delta = difference @ norm_matrix.T  # (c, m, d_l or r)
        sensitivity[start : start + ac.shape[0]] = delta.norm(dim=-1).mean(dim=1) / (2 * h)
    return sensitivity


def _closed_form(projector: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """S_cf(i) = sqrt(g_i^T K g_i / d_v), K = (W1 W1^T) o (W2^T W2), g_i = act'(W1 x_i + b1)."""
    parts = mlp_parts(projector, "closed_form", dtype, x.device)
    _check_width(parts.in_features, x.shape[1], projector)
    gram = jacobian_gram(projector, dtype, x.device)
    a = parts.pre_activation(x)
    # act is elementwise (checked in mlp_parts), so its Jacobian-vector product with ones is act'(a).
    _, slope = torch.func.jvp(parts.act, (a,), (torch.ones_like(a),))
    squared = ((slope @ gram) * slope).sum(dim=1).clamp_min(0)
    return torch.sqrt(squared / x.shape[1])


def precompute(projector: nn.Module, estimator: str, *, rank: int = DEFAULT_RANK, dtype=torch.float32, device=None) -> None:
    """Build and cache the per-model state of ``estimator`` now (upcast weights, SVD factors, K),
    so that the first image is not slower than the rest. Optional: estimators build it on demand."""
    check_choice("estimator", estimator, ESTIMATORS)
    device = torch.device(device) if device is not None else next(projector.parameters()).device
    if estimator == "naive":
        upcast_state(projector, dtype, device)
    elif estimator == "fused":
        mlp_parts(projector, estimator, dtype, device)
    elif estimator == "lowrank":
        lowrank_parts(projector, check_int("rank", rank), dtype, device)
    else:
        jacobian_gram(projector, dtype, device)

