"""Model adapters: what one transformers VLM class says about its visual tokens, behind one public API.

An adapter wraps a loaded model (``adapter_for(model)``) and answers, for a call's inputs:

* ``projector`` (the module whose input is X and output Z), ``sensitivity_projector`` (the per-token
  map the estimators perturb), ``language_model`` and ``decoder_layers``;
* ``features(inputs)`` -> per image X and Z (what the stages, the demo and ``analysis`` read);
  ``encode(inputs)`` -> :class:`Units`, what a projector-stage method selects within (an image, or a
  LLaVA-NeXT patch), with budgets from ``keep``;
* ``token_counts``, ``image_budgets``, ``slots`` and ``position_ids``: where each image's tokens sit
  in the prompt and which positions survive pruning;
* ``supports``: the method kinds it can run (``check(method)`` names both when it cannot);
  ``feature_layer_attention`` for vision-stage methods.

A new model family is one adapter file registered with :func:`register_adapter` (docs/extending.md).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..selection import keep_count

_ADAPTERS: dict[str, type["ModelAdapter"]] = {}


def register_adapter(cls):
    """Class decorator: models whose class (or a base class) is named ``cls.model_class`` use ``cls``."""
    _ADAPTERS[cls.model_class] = cls
    return cls


def supported_models() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(model_class: str) -> type["ModelAdapter"] | None:
    """The adapter registered for a model class name (e.g. a config's ``architectures[0]``), or None."""
    return _ADAPTERS.get(model_class)


def adapter_for(model: nn.Module, keep: int | float | None = None) -> "ModelAdapter":
    """The adapter of ``model``'s family; ``keep`` (tokens or a ratio) sets the budgets of ``encode``."""
    for cls in type(model).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__](model, keep)
    raise TypeError(f"zoo_prune does not support {type(model).__name__}; supported model classes: {', '.join(supported_models())}")


@dataclass
class Units:
    """What a method selects within (images, or LLaVA-NeXT patches), one list entry per unit.

    ``budgets`` k per unit; ``image`` the image each unit belongs to; ``features`` X (N, d_v) and
    ``projected`` Z (N, d_l); ``grids`` the (rows, columns) of each unit's tokens; ``tower_hidden``
    (1 + N, d_v) the vision encoder's feature layer with its CLS token, when asked for.
    """

    budgets: list[int]
    image: list[int]
    features: list[Tensor]
    projected: list[Tensor]
    grids: list[tuple[int, int]] | None = None
    tower_hidden: list[Tensor] | None = None
    positions: list[Tensor] | None = None  # per unit: where its tokens sit in the image's packed layout

    def per_image(self, values: list, how: str = "cat") -> list:
        """Per-unit values grouped by image: ``cat``enated, ``stack``ed, or the ``first`` unit's."""
        groups = [[i for i, image in enumerate(self.image) if image == j] for j in range(self.image[-1] + 1)]
        combine = {"cat": torch.cat, "stack": torch.stack, "first": lambda parts: parts[0]}[how]
        return [combine([values[i] for i in group]) for group in groups]

    def groups(self) -> dict[tuple[int, int], list[int]]:
        """Units by (N, k): each group is one batched selection, equal to per-unit selections."""
        groups = {}
        for i, (tokens, k) in enumerate(zip(self.features, self.budgets)):
            groups.setdefault((tokens.shape[0], k), []).append(i)
        return groups

    def stack(self, name: str, rows: list[int]) -> Tensor:
        return torch.stack([getattr(self, name)[i] for i in rows])


class ModelAdapter:
    """Base adapter; subclasses (``llava.py``, ``llava_next.py``, ``qwen2_5_vl.py``) fill in a family."""

    model_class: ClassVar[str]
    supports: ClassVar[tuple[str, ...]] = ("projector", "vision", "llm")
    image_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    per_patch: ClassVar[bool] = False  # kept_indices per image as a (patches, k) tensor

    def __init__(self, model: nn.Module, keep: int | float | None = None):
        self.model = model
        self.keep = keep
        if keep is not None:
            self.check_keep()

    # -- what subclasses provide ------------------------------------------------------------
    def check_keep(self) -> None:
        """Raise for a ``keep`` no image could satisfy, before anything is patched."""
        keep_count(self.keep, sys.maxsize)

    @property
    def projector(self) -> nn.Module:
        """The module whose input is X and output is Z, as the model calls it."""
        raise NotImplementedError

    @property
    def sensitivity_projector(self) -> nn.Module:
        """The per-token map that ``zo_sensitivity`` perturbs (the projector itself by default)."""
        return self.projector

    def encode(self, inputs: dict, tower_hidden: bool = False) -> Units:
        """Run the model's vision side once on the call's images; the units to select within."""
        raise NotImplementedError

    def token_counts(self, inputs: dict) -> list[int]:
        """Placeholder tokens of each image in the prompt, in the order the model scatters them."""
        raise NotImplementedError

    def feature_layer_attention(self, inputs: dict) -> nn.Module:
        """The attention module of the vision encoder layer whose output feeds the projector."""
        raise NotImplementedError(f"{type(self.model).__name__} exposes no vision feature layer")

    def check_feature_layer(self, method) -> None:
        """Raise unless vision-stage ``method`` can read this model's feature layer."""

    # -- shared by all families ---------------------------------------------------------------
    def check(self, method) -> None:
        """Raise for a method this model cannot run, naming both."""
        if method.kind not in self.supports:
            raise ValueError(
                f"method {method.name!r} (a {method.kind}-stage method) is not supported on {type(self.model).__name__}; "
                f"supported kinds there: {', '.join(self.supports)}"
            )

    def features(self, inputs: dict) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: X (N, d_v) and Z (N, d_l), units of an image concatenated (LLaVA-NeXT: its patches)."""
        units = self.encode(inputs)
        images = range(units.image[-1] + 1)
        pick = lambda values, j: torch.cat([v for v, i in zip(values, units.image) if i == j])  # noqa: E731
        return [pick(units.features, j) for j in images], [pick(units.projected, j) for j in images]

    def assemble(self, inputs: dict, units: Units, tokens: list[Tensor], kept: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: the features its placeholders receive and its kept indices, from each unit's kept
        ``tokens`` and ``kept`` indices. By default units are concatenated in order (one unit per
        image, or per patch: kept indices then a (patches, k) tensor)."""
        return units.per_image(tokens), units.per_image(kept, "stack" if self.per_patch else "first")

    def image_budgets(self, inputs: dict, counts: list[int]) -> list[int]:
        """Visual tokens each image keeps when the image is one unit (and for LLM-stage methods)."""
        return [keep_count(self.keep, n) for n in counts]

    def slots(self, kept: Tensor, n_kept: int, n_placeholders: int) -> Tensor:
        """Which of an image's placeholder columns carry its ``n_kept`` features, in order.

        By default the first ``n_kept`` (the last one repeated if the model sized the run smaller,
        as LLaVA-NeXT's packed layout can be): placeholders are identical and positions are
        renumbered. A family whose positions depend on the column (Qwen2.5-VL) keeps ``kept``.
        """
        return torch.arange(n_kept, device=kept.device).clamp(max=n_placeholders - 1)

    def position_ids(self, inputs: dict) -> Tensor | None:
        """Position ids of the full prompt that must survive pruning (gathered, never renumbered)."""
        return inputs.get("position_ids")

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def pad_token_id(self) -> int:
        config = self.model.config.get_text_config()
        for value in (config.pad_token_id, config.eos_token_id, 0):
            if isinstance(value, list):
                value = value[0]
            if value is not None and value != self.image_token_id:
                return value
        return 0


@contextmanager
def record_io(module: nn.Module):
    """Record, while active, the first input and the output of ``module``'s last call."""
    record = {}

    def hook(module, args, output):
        record["input"], record["output"] = args[0], output

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()
