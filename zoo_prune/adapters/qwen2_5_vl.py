"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): one selection per image on the merger.

The "projector" is the vision tower's merger (method.md section 3): X is its input regrouped per
merged token (the 2 x 2 patches that become one language-model token, concatenated; the tower
runs its blocks in window order, undone here with the model's own window index), Z the merged
tokens as the model scatters them (row-major over each image's merged grid). Sensitivity perturbs
X through :class:`~zoo_prune.GroupedProjector` (the merger's RMSNorm per patch, then its MLP), so
``estimator="auto"`` resolves to ``naive``. ``keep`` is usually a ratio (20% / 10%).

Each kept token keeps its own 3-D M-RoPE position: the full prompt's position ids come from the
model's ``get_rope_index`` and are gathered at the kept columns, never renumbered; generation then
continues from the last text position + 1, as it would unpruned. VisionZip needs a CLS token and
is not available here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..projector import GroupedProjector
from .base import ModelAdapter, Units, record_io, register_adapter


@register_adapter
class Qwen2_5_VLAdapter(ModelAdapter):
    model_class = "Qwen2_5_VLForConditionalGeneration"
    supports = ("projector", "llm")
    image_keys = ("pixel_values", "image_grid_thw")

    def __init__(self, model: nn.Module, keep=None):
        super().__init__(model, keep)
        self.merge_unit = model.config.vision_config.spatial_merge_size ** 2
        self._grouped = GroupedProjector(self.projector, group=self.merge_unit)

    @property
    def projector(self) -> nn.Module:
        return self.model.model.visual.merger

    @property
    def sensitivity_projector(self) -> nn.Module:
        return self._grouped

    def token_counts(self, inputs: dict) -> list[int]:
        return (inputs["image_grid_thw"].prod(dim=-1) // self.merge_unit).tolist()

    def encode(self, inputs: dict, tower_hidden: bool = False) -> Units:
        """One unit per image (images may differ in size)."""
        from transformers.vision_utils import get_vision_window_index

        visual, grid = self.model.model.visual, inputs["image_grid_thw"]
        with record_io(self.projector) as io:
            outputs = self.model.model.get_image_features(inputs["pixel_values"], grid)
        window_index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        merged_order = torch.argsort(window_index.to(io["input"].device))
        features = io["input"].reshape(-1, self.merge_unit * io["input"].shape[-1])[merged_order]
        counts = self.token_counts(inputs)
        budgets = self.image_budgets(inputs, counts) if self.keep is not None else counts
        merge = visual.spatial_merge_size
        grids = [(int(t) * int(h) // merge, int(w) // merge) for t, h, w in grid.tolist()]
        return Units(budgets, list(range(len(counts))), list(features.split(counts)), list(outputs.pooler_output), grids=grids)

    def slots(self, kept: Tensor, n_kept: int, n_placeholders: int) -> Tensor:
        """The kept tokens' own columns, so that their gathered positions are their own."""
        return kept

    def position_ids(self, inputs: dict) -> Tensor:
        """(3, B, L) M-RoPE positions of the full prompt, from the model's ``get_rope_index``."""
        if inputs.get("position_ids") is not None:
            return inputs["position_ids"]
        if inputs.get("pixel_values_videos") is not None:
            raise ValueError("pruning Qwen2.5-VL prompts with videos is not supported")
        input_ids = inputs["input_ids"]
        token_types = inputs.get("mm_token_type_ids")
        if token_types is None:
            token_types = (input_ids == self.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(
            input_ids, token_types, image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs.get("attention_mask")
        )
        return positions

