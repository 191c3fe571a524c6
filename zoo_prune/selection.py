"""Sensitivity-aware diversity selection (paper Eq. 4-5, Algorithm 1 lines 9-18) and its Table-5 variants.

Greedy over k rounds on the projected tokens Z, with Div(i, P) = 1 - max_{j in P} cos(Z_i, Z_j)
(1 while P is empty) and S^ the min-max normalised sensitivity (1 for all tokens if S is flat):

* ``multiply`` (ZOO-Prune): Score = S^ * Div; the first pick is the most sensitive token.
* ``sum``: Score = S^ + Div.
* ``sensitivity``: the k largest S.
* ``diversity``: DivPrune exactly: the first pick is the token farthest (in 1 - cos) from its
  nearest neighbour, then argmax_i min_{j in P} (1 - cos(Z_i, Z_j)).
* ``random``: k tokens uniformly at random.

Chosen tokens are masked out of later rounds, so no index repeats even when scores tie; ties go
to the lowest index. Only rows of the cosine matrix for chosen tokens are computed (O(kNd)), plus,
for ``diversity``, the nearest-neighbour distances in row blocks of the N x N matrix.
"""

from __future__ import annotations

from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_choice, check_float_tensor, check_int, compute_dtype

FUSIONS = ("multiply", "sum", "sensitivity", "diversity", "random")
_NEEDS_SENSITIVITY = ("multiply", "sum", "sensitivity")
# Elements of one block of the cosine matrix in DivPrune's first pick.
_BLOCK_ELEMENTS = 2**24


def normalize_sensitivity(sensitivity: Tensor) -> Tensor:
    """S^ = (S - min S) / (max S - min S) over the last dimension; 1 everywhere if max == min."""
    low = sensitivity.amin(dim=-1, keepdim=True)
    span = sensitivity.amax(dim=-1, keepdim=True) - low
    flat = span == 0
    return torch.where(flat, torch.ones_like(sensitivity), (sensitivity - low) / torch.where(flat, 1, span))


def keep_count(keep: int | float, n_tokens: int) -> int:
    """Tokens to keep: an int is a count (1 <= keep <= n_tokens); a float in (0, 1] a ratio,
    rounded as DivPrune does (``round(ratio * N)``), at least 1."""
    if isinstance(keep, bool) or not isinstance(keep, Real):
        raise TypeError(f"keep must be a token count or a ratio in (0, 1], got {keep!r}")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ValueError(f"keep={keep} as a ratio must lie in (0, 1]")
        return max(1, round(keep * n_tokens))
    keep = check_int("keep", keep)
    if keep > n_tokens:
        raise ValueError(f"keep={keep} is more than the {n_tokens} visual tokens available")
    return keep


def select_tokens(
    projected: Tensor,
    k: int,
    *,
    sensitivity: Tensor | None = None,
    fusion: str = "multiply",
    seed: int | None = None,
) -> Tensor:
    """Indices of the k tokens to keep, **in selection order** (sort them to keep token order).

    Args:
        projected: Z, (N, d_l) or (B, N, d_l): the projector's outputs.
        k: tokens to keep, 1 <= k <= N.
        sensitivity: S, (N,) or (B, N); needed by ``multiply``, ``sum`` and ``sensitivity``.
        fusion: one of ``multiply``, ``sum``, ``sensitivity``, ``diversity``, ``random``.
        seed: for ``random``: every row of a batch gets the same seeded draw; without a seed,
            torch's global generator draws each row.

    Returns:
        LongTensor (k,) or (B, k) on ``projected``'s device.
    """
    check_choice("fusion", fusion, FUSIONS)
    check_float_tensor("projected", projected, dims=(2, 3))
    n = projected.shape[-2]
    k = check_int("k", k)
    if k > n:
        raise ValueError(f"k={k} is more than the N={n} tokens to choose from")
    if fusion in _NEEDS_SENSITIVITY:
        if sensitivity is None:
            raise ValueError(f"fusion={fusion!r} needs a sensitivity tensor")
        check_float_tensor("sensitivity", sensitivity, dims=(1, 2))
        if sensitivity.shape != projected.shape[:-1]:
            raise ValueError(
                f"sensitivity has shape {tuple(sensitivity.shape)} but projected has "
                f"{tuple(projected.shape)}: expected {tuple(projected.shape[:-1])}"
            )
    unbatched = projected.dim() == 2
    z = projected[None] if unbatched else projected
    dtype = compute_dtype(z.dtype)
    z = z.to(dtype)
    if fusion == "random":
        picks = _random(z.shape[0], n, k, seed, z.device)
    else:
        s = None if sensitivity is None else sensitivity.reshape(z.shape[:-1]).to(z.device, dtype)
        picks = _select(z, k, s, fusion)
    return picks[0] if unbatched else picks


def _random(batch: int, n: int, k: int, seed: int | None, device) -> Tensor:
    rows = []
    for _ in range(batch):
        generator = None if seed is None else torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
        rows.append(torch.randperm(n, generator=generator)[:k])
    return torch.stack(rows).to(device)


def _select(z: Tensor, k: int, s: Tensor | None, fusion: str) -> Tensor:
    if fusion == "sensitivity":
        return torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k]
    zn = F.normalize(z, dim=-1)
    if fusion == "diversity":
        first = _nearest_neighbour_distance(zn).argmax(dim=-1)
        score = lambda min_distance: min_distance  # noqa: E731
    else:
        s_hat = normalize_sensitivity(s)
        first = s_hat.argmax(dim=-1)  # Div = 1 while P is empty: the most sensitive token
        if fusion == "multiply":
            score = lambda min_distance: s_hat * min_distance  # noqa: E731
        else:
            score = lambda min_distance: s_hat + min_distance  # noqa: E731
    return _greedy(zn, first, k, score)


def _greedy(zn: Tensor, first: Tensor, k: int, score) -> Tensor:
    """k greedy rounds; ``score(Div)`` with Div(i) = min_{j in P} (1 - cos(Z_i, Z_j))."""
    batch, n, _ = zn.shape
    rows = torch.arange(batch, device=zn.device)
    picks = torch.empty(batch, k, dtype=torch.long, device=zn.device)
    chosen = torch.zeros(batch, n, dtype=torch.bool, device=zn.device)
    min_distance = torch.full((batch, n), float("inf"), dtype=zn.dtype, device=zn.device)
    pick = first
    for step in range(k):
        picks[:, step] = pick
        chosen[rows, pick] = True
        cosine = torch.einsum("bnd,bd->bn", zn, zn[rows, pick])
        min_distance = torch.minimum(min_distance, 1 - cosine)
        if step + 1 < k:
            pick = score(min_distance).masked_fill(chosen, float("-inf")).argmax(dim=-1)
    return picks


def _nearest_neighbour_distance(zn: Tensor) -> Tensor:
    """min_{j != i} (1 - cos(Z_i, Z_j)) for every token, in row blocks of the cosine matrix."""
    batch, n, _ = zn.shape
    block = max(1, _BLOCK_ELEMENTS // (batch * n))
    nearest = torch.empty(batch, n, dtype=zn.dtype, device=zn.device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        distance = 1 - zn[:, start:stop] @ zn.transpose(1, 2)  # (B, rows, N)
        own = torch.arange(start, stop, device=zn.device)
        distance[:, own - start, own] = float("inf")
        nearest[:, start:stop] = distance.amin(dim=-1)
    if n == 1:
        nearest.zero_()
    return nearest
