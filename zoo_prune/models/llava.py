"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one selection per image (method.md section 3).

X is what the model feeds ``model.model.multi_modal_projector`` (the vision tower's
``vision_feature_layer``, CLS dropped by the "default" strategy), N = 576 for the 336-px CLIP
ViT-L/14 tower; Z is the projector's output. Kept placeholder tokens carry the kept features in
original order; the shorter prompt gets the usual consecutive positions (as DivPrune's and
VisionZip's LLaVA code do). VisionZip reads the tower's layer -2 (``vision_feature_layer``).
"""

from __future__ import annotations

from contextlib import nullcontext

from torch import nn

from ..baselines import record_cls_attention
from ..selection import keep_count
from .common import Family, Units, record_io, register_family


@register_family
class LlavaFamily(Family):
    model_class = "LlavaForConditionalGeneration"

    def check_keep(self) -> None:
        keep_count(self.keep, self.tokens_per_image)

    def check_method(self, method) -> None:
        super().check_method(method)
        layer, strategy = self.model.config.vision_feature_layer, self.model.config.vision_feature_select_strategy
        if method.stage == "vision" and (not isinstance(layer, int) or strategy != "default"):
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

    def encode(self, inputs: dict, stage: str) -> Units:
        """One unit per image."""
        features, projected, vision = self.tower_outputs(inputs, stage)
        budgets = [keep_count(self.keep, features.shape[1])] * features.shape[0]
        return Units(budgets, list(range(features.shape[0])), list(features), list(projected), **vision)

    def tower_outputs(self, inputs: dict, stage: str):
        """X and Z of every image crop the tower sees, and for VisionZip its layer's state."""
        layer = inputs.get("vision_feature_layer", self.model.config.vision_feature_layer)
        vision = {}
        if stage == "vision":  # check_method made sure that layer is one int and the tower has a CLS token
            tower = self.model.model.vision_tower
            layers = getattr(tower, "vision_model", tower).encoder.layers
            attention = layers[layer if layer < 0 else layer - 1].self_attn  # the layer that outputs hidden_states[layer]
        with record_io(self.projector) as io, (record_cls_attention(attention) if stage == "vision" else nullcontext()) as cls:
            outputs = self.model.model.get_image_features(**self.vision_inputs(inputs))
        if stage == "vision":
            vision = dict(hidden=list(outputs.hidden_states[layer]), cls_attention=list(cls["cls_attention"]), keys=list(cls["keys"]))
        return io["input"], io["output"], vision
