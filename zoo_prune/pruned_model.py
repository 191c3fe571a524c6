"""``apply_pruning``: visual-token pruning inside a Hugging Face VLM, turned on with one call.

Mechanism. The model instance gets one pair of thin wrappers, ``forward`` and ``generate``
(``functools.wraps`` keeps the signatures that ``generate`` inspects), installed once per model
however many handles come and go; handles register with them and the newest one is in effect.
A call that carries images (``pixel_values``) is rewritten before the model sees it:

1. the method's attachment (``method.attach(adapter)``, :mod:`zoo_prune.methods.base`) sees the call:
   projector- and vision-stage methods return the features each image keeps (per patch for
   LLaVA-NeXT, in original order); LLM-stage methods arm their decoder hooks and change nothing;
2. the prompt is rewritten so that each image keeps as many placeholder tokens as it keeps
   features: ``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids`` and explicit
   ``position_ids`` are gathered from the same columns (re-padded on the batch's padding side),
   and the kept features are passed as ``mm_encoder_outputs``, transformers' entry for
   pre-computed image features.

The model's unchanged forward then scatters exactly the kept features and the language model runs
on the shorter sequence (logits are those of the shorter sequence). ``generate`` runs on the same
shorter prompt and its sequences are spliced back behind the caller's prompt, so that
``output[:, input_ids.shape[1]:]`` are still the new tokens. Nothing inside the model changes; the
adapter (:mod:`zoo_prune.adapters`) says where each family keeps its tokens. ``remove()`` detaches
the handle; when the last one goes, the two instance attributes are put back as they were (if
something else wrapped them since, the wrappers stay as pass-throughs rather than drop that
wrapper), which restores the model exactly. Pruning is for inference: the vision side runs
without gradients.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn

from .adapters import ModelAdapter, adapter_for
from .methods import PruningMethod, get_method

_DISPATCH = "_zoo_prune_dispatch"


class _Dispatch:
    """The one pair of instance wrappers of a model; the newest registered handle is in effect."""

    names = ("forward", "generate")

    def __init__(self, model: nn.Module):
        self.model = model
        self.handles: list[PruningHandle] = []
        # Instance attributes that were there before (accelerate's device hooks wrap ``forward`` so)
        # are called through and put back on removal.
        self.previous = {name: model.__dict__.get(name) for name in self.names}
        self.calls = {name: getattr(model, name) for name in self.names}
        self.wrappers = {name: _wrap(self.calls[name], functools.partial(self.call, name)) for name in self.names}
        model.__dict__.update(self.wrappers)
        model.__dict__[_DISPATCH] = self

    @classmethod
    def of(cls, model: nn.Module) -> "_Dispatch":
        return model.__dict__.get(_DISPATCH) or cls(model)

    def call(self, name: str, *args, **kwargs):
        original = self.calls[name]
        if not self.handles:
            return original(*args, **kwargs)
        handle = self.handles[-1]
        return (handle._forward if name == "forward" else handle._generate)(original, _bind(original, args, kwargs))

    def detach(self, handle: "PruningHandle") -> None:
        self.handles.remove(handle)
        if self.handles:
            return
        ours = all(self.model.__dict__.get(name) is self.wrappers[name] for name in self.names)
        if not ours:
            return  # wrapped again by someone else since: stay, as a pass-through, under their wrapper
        for name, previous in self.previous.items():
            if previous is None:
                self.model.__dict__.pop(name, None)
            else:
                self.model.__dict__[name] = previous
        self.model.__dict__.pop(_DISPATCH, None)


class PruningHandle:
    """Pruning installed on a model. ``remove()`` (or leaving a ``with`` block) restores it.

    ``kept_indices`` (after a call with images): per image, the sorted indices of its kept visual
    tokens among its N tokens (LLaVA: the patch grid, row-major; Qwen2.5-VL: merged tokens,
    row-major); LLaVA-NeXT: a (patches, k) tensor, base patch first, indices within each patch.
    VisionZip: dominant patches then contextual targets; pooling: each cell's centre token;
    LLM-stage methods: indices into the image's placeholder tokens.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, method: PruningMethod):
        self.model, self.adapter, self.method = model, adapter, method
        self.attachment = method.attach(adapter)
        self._dispatch = _Dispatch.of(model)
        self._dispatch.handles.append(self)

    @property
    def kept_indices(self) -> list[Tensor] | None:
        return self.attachment.kept_indices

    @property
    def active(self) -> bool:
        return self._dispatch is not None and self._dispatch.handles[-1:] == [self]

    def remove(self) -> None:
        """Restore the model exactly (once every handle on it is removed); calling it twice is harmless."""
        if self._dispatch is None:
            return
        self.attachment.remove()
        self._dispatch.detach(self)
        self._dispatch = None

    def __enter__(self) -> "PruningHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PruningHandle({type(self.model).__name__}, {self.method!r}, keep={self.adapter.keep!r})"

    def _forward(self, original, inputs: dict):
        if inputs.get("pixel_values") is None:
            return original(**inputs)
        return original(**self.prepare(inputs))

    def _generate(self, original, inputs: dict):
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
        adapter = self.adapter
        if inputs.get("input_ids") is None:
            raise ValueError("pruning needs input_ids (to find the image placeholder tokens), got inputs_embeds only")
        counts = adapter.token_counts(inputs)
        images = image_columns(inputs["input_ids"], adapter.image_token_id, counts)
        features = self.attachment.prepare(inputs, images)
        if features is None:
            return inputs
        kept = self.attachment.kept_indices
        slots = [adapter.slots(k, len(f), n) for k, f, n in zip(kept, features, counts)]
        return relayout(inputs, images, slots, features, adapter)


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


def relayout(inputs: dict, images, slots: list[Tensor], features: list[Tensor], adapter: ModelAdapter) -> dict:
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

    pruned = {key: value for key, value in inputs.items() if key not in adapter.image_keys}
    fills = {"input_ids": adapter.pad_token_id, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0, "token_type_ids": 0}
    for key, fill in fills.items():
        if isinstance(inputs.get(key), Tensor):
            pruned[key] = take(inputs[key], fill)
    if mask is None and bool((lengths != new_length).any()):
        pruned["attention_mask"] = real.long()
    positions = adapter.position_ids(inputs)
    if positions is not None:
        pruned["position_ids"] = take(positions, 0)
    pruned["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    return pruned


def apply_pruning(model: nn.Module, method: "str | PruningMethod" = "zoo", keep: int | float = 64, **options) -> PruningHandle:
    """Prune the visual tokens of ``model`` with ``method``, keeping ``keep`` per image.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` or
            ``Qwen2_5_VLForConditionalGeneration`` as transformers loads it (any dtype or device).
        method: a registered method name (see ``available_methods()``) or a configured method
            object (``get_method(...)``, or an instance of your own registered class).
        keep: a token count per image (LLaVA-NeXT: the budget of a 5-patch image, method.md
            section 3) or a ratio in (0, 1] (Qwen2.5-VL's 20% / 10%).
        **options: the method's options (``m``, ``h``, ``estimator``, ``seed``, ``rank``;
            VisionZip's ``dominant_fraction``; FastV's ``layer``).

    Returns:
        A :class:`PruningHandle`; ``handle.remove()`` or ``with apply_pruning(...):`` restores the model.
        Handles may nest (a user's inside the lmms-eval model's): the newest is in effect while it is
        there, and removing them in any order restores the unpruned model.
    """
    adapter = adapter_for(model, keep)
    if isinstance(method, PruningMethod):
        if options:
            raise TypeError(f"options {sorted(options)} given with a configured method object {method!r}; set them on it")
        pruning_method = method
    else:
        pruning_method = get_method(method, **options)
    adapter.check(pruning_method)
    return PruningHandle(model, adapter, pruning_method)
