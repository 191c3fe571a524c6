"""Pooling: the projected tokens of each unit average-pooled on their 2-D grid down to the budget
(method.md section 4; the simple control the token-pruning literature asks for)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ProjectorMethod, register_method


def pooled_grid(height: int, width: int, k: int) -> tuple[int, int]:
    """The output grid (rows, columns) for ``k`` tokens from a ``height`` x ``width`` grid: the most
    cells not above ``k`` (at most the grid itself), then the aspect ratio closest to the grid's,
    then fewer rows. 576 = 24 x 24 tokens: 64 -> 8 x 8, 128 -> 8 x 16, 192 -> 12 x 16."""
    if k < 1:
        raise ValueError(f"pooling needs k >= 1, got k={k}")
    best = None
    for rows in range(1, height + 1):
        columns = min(width, k // rows)
        if columns < 1:
            break
        key = (-rows * columns, round(abs(math.log((rows / columns) / (height / width))), 9), rows)
        best = min(best or key, key)
    return best[2], -best[0] // best[2]


@register_method("pooling")
@dataclass
class Pooling(ProjectorMethod):
    """Average pooling of Z on each unit's token grid (``torch.nn.functional.adaptive_avg_pool2d``:
    cell i of n covers rows floor(i H / n) .. ceil((i + 1) H / n) - 1). A budget that no grid of
    cells fills exactly keeps the largest grid below it (:func:`pooled_grid`). ``kept_indices`` are
    the tokens at each cell's centre (the positions Qwen2.5-VL's M-RoPE gives the pooled token)."""

    def reduce(self, features: Tensor, projected: Tensor, k: int, *, projector=None, grid=None):
        batch, n, width = projected.shape
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"pooling needs the token grid of units of {n} tokens (not a square)")
            grid = (side, side)
        height, grid_width = grid
        if height * grid_width != n:
            raise ValueError(f"pooling: grid {grid} does not hold {n} tokens")
        rows, columns = pooled_grid(height, grid_width, k)
        image = projected.transpose(1, 2).reshape(batch, width, height, grid_width)
        pooled = F.adaptive_avg_pool2d(image.float(), (rows, columns)).to(projected.dtype)
        tokens = pooled.reshape(batch, width, rows * columns).transpose(1, 2)
        centre_rows = [(math.floor(i * height / rows) + math.ceil((i + 1) * height / rows) - 1) // 2 for i in range(rows)]
        centre_columns = [(math.floor(j * grid_width / columns) + math.ceil((j + 1) * grid_width / columns) - 1) // 2
                          for j in range(columns)]
        index = torch.tensor([r * grid_width + c for r in centre_rows for c in centre_columns], device=projected.device)
        return tokens, index.expand(batch, -1)
