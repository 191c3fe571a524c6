"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one selection per image (method.md section 3).

X is what the model feeds ``model.model.multi_modal_projector`` (the vision tower's
``vision_feature_layer``, CLS dropped by the "default" strategy), N = 576 for the 336-px CLIP
ViT-L/14 tower; Z is the projector's output. Kept placeholder tokens carry the kept features in
original order; the shorter prompt gets the usual consecutive positions (as DivPrune's and
VisionZip's LLaVA code do). VisionZip reads the tower's layer -2 (``vision_feature_layer``).
"""

from __future__ import annotations

import math

from torch import nn

from ..selection import keep_count
from .base import ModelAdapter, Units, record_io, register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    model_class = "LlavaForConditionalGeneration"

    def check_keep(self) -> None:
        keep_count(self.keep, self.tokens_per_image)

    def check_feature_layer(self, method) -> None:
        layer, strategy = self.model.config.vision_feature_layer, self.model.config.vision_feature_select_strategy
        if not isinstance(layer, int) or strategy != "default":
            raise ValueError(
                f"{method.name!r} needs one vision feature layer and a CLS token (strategy 'default'); this "
                f"{type(self.model).__name__} has vision_feature_layer={layer!r}, vision_feature_select_strategy={strategy!r}"
            )

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def tokens_per_image(self) -> int:
        """N visual tokens per image (per patch for LLaVA-NeXT)."""
        config = self.model.config
        n = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        return n if config.vision_feature_select_strategy == "default" else n + 1

    def token_counts(self, inputs: dict) -> list[int]:
        return [self.tokens_per_image] * inputs["pixel_values"].shape[0]

    def vision_inputs(self, inputs: dict) -> dict:
        """The arguments of the model's ``get_image_features`` that this call carries."""
        names = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
        return {name: inputs[name] for name in names if inputs.get(name) is not None}

    def encode(self, inputs: dict, tower_hidden: bool = False) -> Units:
        """One unit per image."""
        features, projected, hidden = self.tower_outputs(inputs, tower_hidden)
        budgets = [keep_count(self.keep, features.shape[1]) if self.keep is not None else features.shape[1]] * features.shape[0]
        return Units(budgets, list(range(features.shape[0])), list(features), list(projected),
                     grids=self.unit_grids(features.shape[0], features.shape[1]), tower_hidden=hidden)

    def unit_grids(self, units: int, tokens: int) -> list[tuple[int, int]] | None:
        """The square token grid of each unit (none without one, e.g. the "full" strategy's CLS)."""
        side = math.isqrt(tokens)
        return [(side, side)] * units if side * side == tokens else None

    def feature_layer_attention(self, inputs: dict) -> nn.Module:
        """The attention of the tower layer that outputs ``hidden_states[vision_feature_layer]``."""
        layer = inputs.get("vision_feature_layer", self.model.config.vision_feature_layer)
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return layers[layer if layer < 0 else layer - 1].self_attn

    def tower_outputs(self, inputs: dict, tower_hidden: bool = False):
        """X and Z of every image crop the tower sees, and (asked for) its feature layer's output."""
        layer = inputs.get("vision_feature_layer", self.model.config.vision_feature_layer)
        with record_io(self.projector) as io:
            outputs = self.model.model.get_image_features(**self.vision_inputs(inputs))
        hidden = list(outputs.hidden_states[layer]) if tower_hidden else None
        return io["input"], io["output"], hidden
