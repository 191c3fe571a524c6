"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): one selection per patch (method.md section 3).

An image is up to 5 patches of N = 576 tokens (the base image, then the anyres crops in raster
order of the high-resolution grid). ``keep`` is the budget of a 5-patch image (640 / 320 / 160),
i.e. keep / 5 tokens per patch, selected in each patch separately; an image of P patches keeps
P * keep / 5. The language model receives the base patch's kept tokens, then each crop's kept
tokens, crop by crop, each in original order, with no unpadding and no newline tokens (as
VisionZip's implementation, which the paper follows). The image's placeholder run in the prompt
(sized by the processor for the packed, unpadded layout) is resized to that count. Sensitivity
in the paper uses the ``lowrank`` estimator (rank 128): the paper profile asks for it in params.yaml.
"""

from __future__ import annotations

import sys

import torch

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
        per_image = [p * self.keep_per_patch for p in self.patches_per_image(inputs)]
        return [keep_count(k, n) for k, n in zip(per_image, counts)]

    def encode(self, inputs: dict, tower_hidden: bool = False) -> Units:
        """One unit per patch, an image's patches consecutive, base patch first."""
        features, projected, hidden = self.tower_outputs(inputs, tower_hidden)
        patches = self.patches_per_image(inputs)
        image = [i for i, p in enumerate(patches) for _ in range(p)]
        budget = self.keep_per_patch if self.keep is not None else features.shape[1]
        return Units([budget] * len(image), image, list(features), list(projected),
                     grids=self.unit_grids(len(image), features.shape[1]), tower_hidden=hidden)
