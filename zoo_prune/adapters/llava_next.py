"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): selection within the model's own layout (method.md section 3).

An image is up to 5 patches of N = 576 tokens: the base image, then the anyres crops, which the
model tiles into one high-resolution grid, unpads (drops the rows or columns of padding) and packs
row by row with a learned newline token after each row. Pruned and unpruned runs differ only by
pruning, so selection works in that same layout, in two units per image: the base patch (N tokens)
and the unpadded crop grid (its tokens in the model's order, newlines excluded). ``keep`` is the
budget of a 5-patch image (640 / 320 / 160), i.e. keep / 5 per patch: the base keeps keep / 5 and
the crop grid keeps its proportional share, keep / 5 x (its tokens / N) (an image of fewer or
unpadded crops keeps proportionally fewer). The language model receives the kept tokens in the
packed order, and a newline after each crop row that keeps at least one token (the newline of a
single-patch image is kept): with keep = every token this is exactly the unpruned model's input.
The newlines count in what reaches the language model (``image_budgets``: the visual tokens
kept; newlines come on top, one per kept row). ``kept_indices``: per image, the kept tokens'
positions in the packed sequence (base 0..N-1 first; newline positions never listed).

VisionZip acts inside the tower, patch by patch, and keeps its own code's layout: base patch then
the crops patch after patch, no unpadding and no newlines (``encode(tower_hidden=True)``).
In the paper, sensitivity on this model uses the ``lowrank`` estimator (rank 128): the paper
profile asks for it in params.yaml.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from ..selection import keep_count
from .base import Units, register_adapter
from .llava import LlavaAdapter

PATCHES_IN_BUDGET = 5


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    model_class = "LlavaNextForConditionalGeneration"
    image_keys = ("pixel_values", "image_sizes")
    per_patch = True

    def check_keep(self) -> None:
        keep_count(self.keep, PATCHES_IN_BUDGET * self.tokens_per_image)

    @property
    def keep_per_patch(self) -> int:
        if isinstance(self.keep, float):
            return keep_count(self.keep, self.tokens_per_image)
        return keep_count(max(1, round(self.keep / PATCHES_IN_BUDGET)), self.tokens_per_image)

    def patches_per_image(self, inputs: dict) -> list[int]:
        """P of each image, as the model computes it from ``image_sizes``."""
        modeling = sys.modules[type(self.model.model).__module__]
        config = self.model.config
        return [
            modeling.image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in inputs["image_sizes"]
        ]

    def token_counts(self, inputs: dict) -> list[int]:
        """Placeholders of each image: the model's own packing (unpad + newlines) of dummy features."""
        strategy = inputs.get("vision_feature_select_strategy", self.model.config.vision_feature_select_strategy)
        dummies = [torch.zeros(p, self.tokens_per_image, 1) for p in self.patches_per_image(inputs)]
        _, lengths = self.model.model.pack_image_features(dummies, inputs["image_sizes"], strategy, torch.zeros(1))
        return lengths.tolist()

    def image_budgets(self, inputs: dict, counts: list[int]) -> list[int]:
        """Visual tokens each image keeps (LLM-stage methods): its patches' shares of the budget, at
        most its packed tokens (unpadding can leave fewer than patches x 576: keep = all keeps all)."""
        per_image = [p * self.keep_per_patch for p in self.patches_per_image(inputs)]
        return [keep_count(min(k, n), n) for k, n in zip(per_image, counts)]

    def unit_budget(self, tokens: int) -> int:
        """Tokens a unit of ``tokens`` keeps: the per-patch budget scaled by its share of a patch."""
        if self.keep is None:
            return tokens
        if isinstance(self.keep, float):
            return keep_count(self.keep, tokens)
        return min(tokens, max(1, round(self.keep_per_patch * tokens / self.tokens_per_image)))

    def packed_layout(self, inputs: dict, patches: list[int]) -> list[Tensor]:
        """Per image, for each position of the model's packed sequence: the index (patch * N + token)
        of the feature there, or -1 for a newline; computed by the model's own ``pack_image_features``
        on index-valued dummies."""
        n = self.tokens_per_image
        strategy = inputs.get("vision_feature_select_strategy", self.model.config.vision_feature_select_strategy)
        dummies = [torch.arange(p * n, dtype=torch.float64).view(p, n, 1) for p in patches]
        packed, _ = self.model.model.pack_image_features(dummies, inputs["image_sizes"], strategy,
                                                         torch.tensor([-1.0], dtype=torch.float64))
        return [sequence[:, 0].round().long() for sequence in packed]

    def encode(self, inputs: dict, tower_hidden: bool = False) -> Units:
        """Two units per image in the packed layout (base patch, crop grid); with ``tower_hidden``
        (vision-stage methods) one unit per patch, base patch first."""
        features, projected, hidden = self.tower_outputs(inputs, tower_hidden)
        patches = self.patches_per_image(inputs)
        n = self.tokens_per_image
        if tower_hidden:
            image = [i for i, p in enumerate(patches) for _ in range(p)]
            budget = self.keep_per_patch if self.keep is not None else n
            return Units([budget] * len(image), image, list(features), list(projected),
                         grids=self.unit_grids(len(image), n), tower_hidden=hidden)
        flat_x, flat_z = features.reshape(-1, features.shape[-1]), projected.reshape(-1, projected.shape[-1])
        offsets = [0]
        for p in patches:
            offsets.append(offsets[-1] + p * n)
        units = Units([], [], [], [], grids=[], positions=[])
        for i, (layout, p) in enumerate(zip(self.packed_layout(inputs, patches), patches)):
            tokens = layout >= 0
            areas = [tokens & (layout < n)] + ([tokens & (layout >= n)] if p > 1 else [])
            for area in areas:
                positions = area.nonzero()[:, 0]
                index = offsets[i] + layout[positions]
                rows = int((layout[positions[0]:positions[-1] + 2] < 0).sum()) if area is not areas[0] else 0
                grid = (rows, len(positions) // rows) if rows and len(positions) % rows == 0 else (
                    self.unit_grids(1, len(positions)) or [None])[0]
                units.budgets.append(self.unit_budget(len(positions)))
                units.image.append(i)
                units.features.append(flat_x[index.to(flat_x.device)])
                units.projected.append(flat_z[index.to(flat_z.device)])
                units.grids.append(grid)
                units.positions.append(positions)
        return units

    def assemble(self, inputs, units, tokens, kept):
        """The kept tokens of an image's units in packed order, a newline after each crop row that
        keeps a token (and a single-patch image's newline); kept indices as packed positions."""
        if units.positions is None:
            return super().assemble(inputs, units, tokens, kept)
        newline = self.model.model.image_newline
        patches = self.patches_per_image(inputs)
        layouts = self.packed_layout(inputs, patches)
        features, positions = [], []
        for i, layout in enumerate(layouts):
            rows = [j for j, image in enumerate(units.image) if image == i]
            chosen = torch.cat([units.positions[j].to(kept[j].device)[kept[j]] for j in rows])
            values = torch.cat([tokens[j] for j in rows])
            take = torch.zeros(len(layout), dtype=torch.bool)
            take[chosen.cpu()] = True
            crops_start = self.tokens_per_image if patches[i] > 1 else 0
            row_start = crops_start
            for q in (layout < 0).nonzero()[:, 0].tolist():  # a newline ends the row since the last one
                take[q] = bool(take[row_start:q].any())
                row_start = q + 1
            order = take.nonzero()[:, 0]
            slot = torch.full((len(layout),), -1, dtype=torch.long)
            slot[chosen.cpu()] = torch.arange(len(chosen))
            pieces = [values[slot[q]] if layout[q] >= 0 else newline.to(values.dtype) for q in order.tolist()]
            features.append(torch.stack(pieces))
            positions.append(chosen.sort().values)
        return features, positions
