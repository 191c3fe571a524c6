"""``apply_pruning``: visual-token pruning inside a Hugging Face VLM, turned on with one call.

Mechanism. The handle sets, on the model instance only, ``forward`` and ``generate`` to thin
wrappers (``functools.wraps`` keeps the signatures that ``generate`` inspects). A call that
carries images (``pixel_values``) is rewritten before the model sees it:

1. the model's own ``get_image_features`` runs once, with forward hooks recording the projector's
   input X and output Z (method.md, Notation), and for VisionZip the vision tower's layer -2;
2. the method keeps k tokens per image (per patch for LLaVA-NeXT), in original order;
3. the prompt is rewritten so that each image keeps as many placeholder tokens as it keeps
   features: ``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids`` and explicit
   ``position_ids`` are gathered from the same columns (re-padded on the batch's padding side),
   and the kept features are passed as ``mm_encoder_outputs``, transformers' entry for
   pre-computed image features.

The model's unchanged forward then scatters exactly the kept features and the language model runs
on the shorter sequence (logits are those of the shorter sequence). ``generate`` runs on the same
shorter prompt and its sequences are spliced back behind the caller's prompt, so that
``output[:, input_ids.shape[1]:]`` are still the new tokens. This is preferred over patching
transformers' internals: nothing inside the model changes, and ``remove()`` puts the two instance
attributes back as they were (and removes the hooks), which restores the model exactly. FastV acts
inside the language model (``baselines/fastv.py``): the wrappers only tell its hooks where each
image's tokens are. Pruning is for inference: the vision side runs without gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..baselines import FastVHooks
from ..methods import PruningMethod, get_method
from ..selection import keep_count

_FAMILIES: dict[str, type["Family"]] = {}


def register_family(cls):
    """Class decorator: ``apply_pruning`` handles models whose class (or a base) is ``cls.model_class``."""
    _FAMILIES[cls.model_class] = cls
    return cls


class Family:
    """How one transformers VLM class lays out visual tokens; subclasses live in llava.py etc.

    ``encode`` runs the model's vision side and returns :class:`Units`, what a method selects
    within (an image, or a LLaVA-NeXT patch); the other methods say where each image's tokens sit
    in the prompt and which positions must survive pruning.
    """

    model_class: ClassVar[str]
    stages: ClassVar[tuple[str, ...]] = ("projector", "vision", "llm")
    image_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    method_defaults: ClassVar[dict] = {}
    per_patch: ClassVar[bool] = False

    def __init__(self, model: nn.Module, keep: int | float):
        self.model = model
        self.keep = keep
        self.check_keep()

    # -- what subclasses provide ------------------------------------------------------------
    def check_keep(self) -> None:
        """Raise for a ``keep`` no image could satisfy, before anything is patched."""
        keep_count(self.keep, sys.maxsize)

    def check_method(self, method: PruningMethod) -> None:
        """Raise for a method this model cannot run, naming both."""
        if method.stage not in self.stages:
            raise ValueError(
                f"method {method.name!r} (acts in stage {method.stage!r}) is not supported on {type(self.model).__name__}; "
                f"supported stages there: {', '.join(self.stages)}"
            )

    @property
    def projector(self) -> nn.Module:
        """The module whose input is X and output is Z, as the model calls it."""
        raise NotImplementedError

    @property
    def sensitivity_projector(self) -> nn.Module:
        """The per-token map that ``zo_sensitivity`` perturbs (the projector itself by default)."""
        return self.projector

    def encode(self, inputs: dict, stage: str) -> "Units":
        """Run the model's vision side once on the call's images; the units to select within."""
        raise NotImplementedError

    def token_counts(self, inputs: dict) -> list[int]:
        """Placeholder tokens of each image in the prompt, in the order the model scatters them."""
        raise NotImplementedError

    def image_budgets(self, inputs: dict, counts: list[int]) -> list[int]:
        """Visual tokens each image keeps when the image is one unit (and for FastV, always)."""
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

    # -- shared by all families ---------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

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


def family_for(model: nn.Module, keep) -> Family:
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__](model, keep)
    raise TypeError(
        f"apply_pruning does not support {type(model).__name__}; supported model classes: {', '.join(sorted(_FAMILIES))}"
    )


@dataclass
class Units:
    """What a method selects within (images, or LLaVA-NeXT patches), one list entry per unit.

    ``features`` X (N, d_v) and ``projected`` Z (N, d_l) for projector-stage methods; ``hidden``
    (1 + N, d_v), ``cls_attention`` (N,) and ``keys`` (1 + N, d_k) of the vision tower's layer -2
    for VisionZip; ``budgets`` k per unit; ``image`` the image each unit belongs to.
    """

    budgets: list[int]
    image: list[int]
    features: list[Tensor] | None = None
    projected: list[Tensor] | None = None
    hidden: list[Tensor] | None = None
    cls_attention: list[Tensor] | None = None
    keys: list[Tensor] | None = None

    def groups(self) -> dict[tuple[int, int], list[int]]:
        """Units by (N, k): each group is one batched selection, equal to per-unit selections."""
        sizes = self.features or self.cls_attention
        groups = {}
        for i, (tokens, k) in enumerate(zip(sizes, self.budgets)):
            groups.setdefault((tokens.shape[0], k), []).append(i)
        return groups

    def stack(self, name: str, rows: list[int]) -> Tensor:
        return torch.stack([getattr(self, name)[i] for i in rows])


class PruningHandle:
    """Pruning installed on a model. ``remove()`` (or leaving a ``with`` block) restores it.

    ``kept_indices`` (after a call with images): per image, the sorted indices of its kept visual
    tokens among its N tokens (LLaVA: the patch grid, row-major; Qwen2.5-VL: merged tokens,
    row-major); LLaVA-NeXT: a (patches, k) tensor, base patch first, indices within each patch.
    VisionZip: dominant patches then contextual targets; FastV: indices into the image's
    placeholder tokens.
    """

    def __init__(self, model: nn.Module, family: Family, method: PruningMethod):
        self.model, self.family, self.method = model, family, method
        self._kept = None
        self._fastv = None
        self._installed = False

    @property
    def kept_indices(self) -> list[Tensor] | None:
        return self._fastv.kept_indices if self._fastv is not None else self._kept

    def _install(self) -> None:
        model = self.model
        # Instance attributes that were there before (accelerate's device hooks wrap ``forward`` so)
        # are called through and put back on removal.
        self._previous = {name: model.__dict__.get(name) for name in ("forward", "generate")}
        self._forward_call, self._generate_call = model.forward, model.generate
        self._installed = True
        model._zoo_prune_handle = self
        if self.method.stage == "llm":
            self._fastv = FastVHooks(self.family.language_model, self.family.language_model.layers, self.method.layer)
        model.forward = _wrap(self._forward_call, self._forward)
        model.generate = _wrap(self._generate_call, self._generate)

    def remove(self) -> None:
        """Restore the model exactly; calling it twice is harmless."""
        if not self._installed:
            return
        for name, previous in self._previous.items():
            if previous is None:
                self.model.__dict__.pop(name, None)
            else:
                self.model.__dict__[name] = previous
        self.model.__dict__.pop("_zoo_prune_handle", None)
        if self._fastv is not None:
            self._fastv.remove()
        self._installed = False

    def __enter__(self) -> "PruningHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PruningHandle({type(self.model).__name__}, {self.method!r}, keep={self.family.keep!r})"

    def _forward(self, *args, **kwargs):
        original = self._forward_call
        inputs = _bind(original, args, kwargs)
        if inputs.get("pixel_values") is None:
            return original(**inputs)
        return original(**self.prepare(inputs))

    def _generate(self, *args, **kwargs):
        original = self._generate_call
        inputs = _bind(original, args, kwargs)
        if inputs.get("input_ids") is None and isinstance(inputs.get("inputs"), Tensor):
            inputs["input_ids"] = inputs.pop("inputs")
        if inputs.get("pixel_values") is None:
            return original(**inputs)
        prompt = inputs["input_ids"]
        pruned = self.prepare(inputs)
        output = original(**pruned)
        if pruned["input_ids"] is prompt:
            return output
        sequences = output if isinstance(output, Tensor) else output.sequences
        prompt = prompt.to(sequences.device).repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
        spliced = torch.cat([prompt, sequences[:, pruned["input_ids"].shape[1] :]], dim=1)
        if isinstance(output, Tensor):
            return spliced
        output.sequences = spliced
        return output

    def prepare(self, inputs: dict) -> dict:
        """The call's arguments with pruning applied (see the module docstring)."""
        family = self.family
        if inputs.get("input_ids") is None:
            raise ValueError("pruning needs input_ids (to find the image placeholder tokens), got inputs_embeds only")
        counts = family.token_counts(inputs)
        images = image_columns(inputs["input_ids"], family.image_token_id, counts)
        if self.method.stage == "llm":
            budgets = family.image_budgets(inputs, counts)
            armed = [(row, columns, k) for (row, columns), k in zip(images, budgets)]
            self._fastv.arm(armed, inputs["input_ids"].shape[1], inputs.get("attention_mask"))
            return inputs
        with torch.no_grad():
            features, self._kept = self.kept_features(inputs)
        slots = [family.slots(kept, len(f), n) for kept, f, n in zip(self._kept, features, counts)]
        return relayout(inputs, images, slots, features, family)

    def kept_features(self, inputs: dict) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: the features the language model receives (k_i, d_l) and the kept indices."""
        family, method = self.family, self.method
        units = family.encode(inputs, method.stage)

        def run(rows: list[int], k: int) -> tuple[Tensor, Tensor]:
            if method.stage == "vision":
                tokens, indices = method.merge(units.stack("hidden", rows), units.stack("cls_attention", rows), units.stack("keys", rows), k)
                return family.projector(tokens), indices
            projected = units.stack("projected", rows)
            picks = method.select(units.stack("features", rows), projected, k, projector=family.sensitivity_projector)
            picks = picks.sort(dim=-1).values
            return projected.gather(1, picks[..., None].expand(-1, -1, projected.shape[-1])), picks

        features, indices = [None] * len(units.budgets), [None] * len(units.budgets)
        for (_, k), rows in units.groups().items():
            chosen, kept = run(rows, k)
            for j, i in enumerate(rows):
                features[i], indices[i] = chosen[j], kept[j]
        groups = [[i for i, image in enumerate(units.image) if image == j] for j in range(units.image[-1] + 1)]
        per_image = [torch.cat([features[i] for i in group]) for group in groups]
        kept = [torch.stack([indices[i] for i in group]) if family.per_patch else indices[group[0]] for group in groups]
        return per_image, kept


def _wrap(original, implementation):
    """A function that calls ``implementation`` and carries ``original``'s name and signature."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return implementation(*args, **kwargs)

    return wrapper


def _bind(function, args: tuple, kwargs: dict) -> dict:
    """Keyword form of a call, so that positional inputs (``model(input_ids)``) are seen too."""
    bound = inspect.signature(function).bind_partial(*args, **kwargs).arguments
    extra = bound.pop("kwargs", {})
    return {**bound, **extra}


def image_columns(input_ids: Tensor, image_token_id: int, counts: list[int]) -> list[tuple[int, Tensor]]:
    """(row, columns) of each image's placeholder tokens, images in the order the model scatters
    their features (row-major over the batch, as ``masked_scatter`` does)."""
    rows, columns = (input_ids == image_token_id).nonzero(as_tuple=True)
    if rows.numel() != sum(counts):
        raise ValueError(f"the prompt holds {rows.numel()} image tokens but its images have {sum(counts)} features")
    images, start = [], 0
    for n in counts:
        row = rows[start : start + n]
        if bool((row != row[0]).any()):
            raise ValueError("an image's placeholder tokens span two prompts of the batch")
        images.append((int(row[0]), columns[start : start + n]))
        start += n
    return images


def relayout(inputs: dict, images, slots: list[Tensor], features: list[Tensor], family: Family) -> dict:
    """``inputs`` with each image's placeholders reduced to its ``slots`` and its kept ``features``
    passed as pre-computed image features; per-token tensors gathered from the same columns."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    input_ids = inputs["input_ids"]
    batch, length = input_ids.shape
    copies = torch.ones(batch, length, dtype=torch.long, device=input_ids.device)
    for (row, columns), slot in zip(images, slots):
        copies[row, columns] = 0
        copies[row].index_add_(0, columns[slot.to(columns.device)], torch.ones_like(slot, device=columns.device))
    lengths = copies.sum(dim=1)
    new_length = int(lengths.max())
    mask = inputs.get("attention_mask")
    right_padded = mask is not None and bool((mask[:, -1] == 0).any())
    source = torch.zeros(batch, new_length, dtype=torch.long, device=input_ids.device)
    real = torch.zeros(batch, new_length, dtype=torch.bool, device=input_ids.device)
    for row in range(batch):
        columns = torch.repeat_interleave(torch.arange(length, device=input_ids.device), copies[row])
        span = slice(0, len(columns)) if right_padded else slice(new_length - len(columns), new_length)
        source[row, span], real[row, span] = columns, True

    def take(tensor: Tensor, fill) -> Tensor:
        index = source.to(tensor.device).expand(*tensor.shape[:-2], batch, new_length)
        return tensor.gather(-1, index).masked_fill(~real.to(tensor.device), fill)

    pruned = {key: value for key, value in inputs.items() if key not in family.image_keys}
    fills = {"input_ids": family.pad_token_id, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0, "token_type_ids": 0}
    for key, fill in fills.items():
        if isinstance(inputs.get(key), Tensor):
            pruned[key] = take(inputs[key], fill)
    if mask is None and bool((lengths != new_length).any()):
        pruned["attention_mask"] = real.long()
    positions = family.position_ids(inputs)
    if positions is not None:
        pruned["position_ids"] = take(positions, 0)
    pruned["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    return pruned


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


def apply_pruning(model: nn.Module, method: str = "zoo", keep: int | float = 64, **options) -> PruningHandle:
    """Prune the visual tokens of ``model`` with ``method``, keeping ``keep`` per image.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` or
            ``Qwen2_5_VLForConditionalGeneration`` as transformers loads it (any dtype or device).
        method: a registered method name (``zoo``, ``sum_fusion``, ``sensitivity_only``,
            ``divprune``, ``random``, ``visionzip``, ``fastv``; see ``available_methods()``).
        keep: a token count per image (LLaVA-NeXT: the budget of a 5-patch image, method.md
            section 3) or a ratio in (0, 1] (Qwen2.5-VL's 20% / 10%).
        **options: the method's options (``m``, ``h``, ``estimator``, ``seed``, ``rank``;
            VisionZip's ``dominant_fraction``; FastV's ``layer``).

    Returns:
        A :class:`PruningHandle`; ``handle.remove()`` or ``with apply_pruning(...):`` restores the model.
    """
    family = family_for(model, keep)
    fields = {field.name for field in dataclasses.fields(get_method(method))}  # validates the name first
    options = {**{k: v for k, v in family.method_defaults.items() if k in fields}, **options}
    pruning_method = get_method(method, **options)
    family.check_method(pruning_method)
    if model.__dict__.get("_zoo_prune_handle") is not None:
        raise RuntimeError(f"{type(model).__name__} already has pruning applied ({model._zoo_prune_handle!r}); remove it first")
    handle = PruningHandle(model, family, pruning_method)
    try:
        handle._install()
    except BaseException:
        handle.remove()  # nothing half-patched stays behind
        raise
    return handle
