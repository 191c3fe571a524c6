"""The three kinds of pruning method and the registry that names them.

A method is a dataclass whose fields are its options (``get_method("zoo", m=64)``); its class says
what kind it is, and that kind owns the mechanics of putting it into a model:

* :class:`ProjectorMethod` (``kind = "projector"``): chooses, per image (or LLaVA-NeXT patch), which
  tokens reach the language model from the projector's input X and output Z (``reduce``, by default
  ``select`` + gather). ZOO-Prune, its Table-5 variants, DivPrune, random, pooling.
* :class:`VisionMethod` (``kind = "vision"``): acts inside the vision encoder and hands the projector
  fewer tokens (VisionZip).
* :class:`LLMMethod` (``kind = "llm"``): drops visual tokens inside the language model's decoder
  (FastV, SparseVLM).

:func:`~zoo_prune.apply_pruning` asks the method for an *attachment* (``method.attach(adapter)``),
which installs whatever the method needs on the model, rewrites each call that carries images
(``prepare``) and removes itself exactly (``remove``). The wrapper (``zoo_prune.pruned_model``)
knows no method by name: it dispatches on the method object.

Registry metadata (:func:`method_class`): ``name``, ``kind``, ``params_section`` (the params.yaml
section its options come from, if any), ``options()`` and ``stochastic`` (results depend on a seed).
Stages, params validation and the FLOPs ledger read these instead of lists of names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from ..adapters.base import ModelAdapter, Units

KINDS = ("projector", "vision", "llm")
_REGISTRY: dict[str, type["PruningMethod"]] = {}


def register_method(name: str):
    """Class decorator: make a :class:`PruningMethod` dataclass available as ``get_method(name)``."""

    def decorate(cls):
        if name in _REGISTRY:
            raise ValueError(f"a pruning method named {name!r} is already registered ({_REGISTRY[name].__name__})")
        if not dataclasses.is_dataclass(cls):
            cls = dataclass(cls)
        if cls.kind not in KINDS:
            raise ValueError(f"pruning method {name!r} has kind {cls.kind!r}; kinds: {', '.join(KINDS)}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_methods(kind: str | None = None) -> list[str]:
    """Registered method names (of one ``kind`` if given), sorted."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown method kind {kind!r}; kinds: {', '.join(KINDS)}")
    return sorted(name for name, cls in _REGISTRY.items() if kind is None or cls.kind == kind)


def method_class(name: str) -> type["PruningMethod"]:
    """The class registered as ``name`` (its metadata: ``kind``, ``params_section``, ``options()``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def get_method(name: str, **options) -> "PruningMethod":
    """An instance of the method registered as ``name``, configured by ``options``."""
    cls = method_class(name)
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        allowed = ", ".join(sorted(cls.options())) or "none"
        raise TypeError(f"pruning method {name!r} has no option {', '.join(map(repr, unknown))}; its options: {allowed}")
    return cls(**options)


@dataclass
class PruningMethod:
    """Base of every method: options are dataclass fields; the kind's ``attach`` does the rest."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # set by the three kinds below; register_method refuses anything else
    params_section: ClassVar[str | None] = None  # params.yaml section holding its options

    @classmethod
    def options(cls) -> dict[str, object]:
        """Option names and defaults (a method's defaults live here and nowhere else)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def stochastic(cls) -> bool:
        """Whether results depend on a random draw (then ``seed`` is one of its options)."""
        return "seed" in cls.options()

    def attach(self, adapter: "ModelAdapter") -> "Attachment":
        raise NotImplementedError

    def llm_tokens(self, visual: int, keep: int, text: int, layers: int) -> list[int]:
        """Tokens entering each of the ``layers`` decoder layers in a prefill of one image of ``visual``
        tokens pruned to ``keep``, with ``text`` text tokens (what the FLOPs ledger counts). Methods
        that prune before the language model: ``text + keep`` at every layer."""
        return [text + keep] * layers

    def flops(self, visual: int, keep: int, width: int) -> float:
        """FLOPs of the method's own work per image outside the model's modules (selection), 2 per
        multiply-add; 0 unless the method says otherwise."""
        return 0.0


class Attachment:
    """A method installed on one model (``method.attach(adapter)``).

    ``prepare(inputs, images)`` sees every call that carries images: it returns the features each
    image passes to the language model (the wrapper then shortens the prompt to match) or ``None``
    when the call goes through unchanged (LLM-stage methods act inside the decoder). ``kept_indices``
    describes the last call. ``remove()`` undoes whatever ``__init__`` installed.
    """

    def __init__(self, method: PruningMethod, adapter: "ModelAdapter"):
        self.method, self.adapter = method, adapter
        self.kept_indices = None

    def prepare(self, inputs: dict, images: list[tuple[int, Tensor]]) -> list[Tensor] | None:
        raise NotImplementedError

    def remove(self) -> None:
        pass

    def timed_calls(self) -> list[tuple[object, str, str]]:
        """``(object, method name, part)`` of the calls that are the method's own work in a call with images,
        for timing it apart from the model's (``zoo_prune.timing.Parts``): ``selection``, and ``sensitivity``
        for the zeroth-order sensitivities (called inside the selection: timed apart from it)."""
        return []


def _run_groups(units: "Units", run) -> tuple[list, list]:
    """``run(rows, k)`` once per group of units of equal size and budget (one batched call each);
    per-unit results back in unit order."""
    features, indices = [None] * len(units.budgets), [None] * len(units.budgets)
    for (_, k), rows in units.groups().items():
        chosen, kept = run(rows, k)
        for j, i in enumerate(rows):
            features[i], indices[i] = chosen[j], kept[j]
    return features, indices


# ------------------------------------------------------------------ projector stage


@dataclass
class ProjectorMethod(PruningMethod):
    """Chooses among the projected tokens Z of each unit before the language model.

    Subclasses implement ``select(features, projected, k, *, projector)`` -> kept indices in
    selection order, (k,) or (B, k); or override ``reduce`` to produce tokens that are not a subset
    (pooling). The kept tokens reach the language model in their original order.
    """

    kind: ClassVar[str] = "projector"

    def select(self, features: Tensor, projected: Tensor, k: int, *, projector: nn.Module) -> Tensor:
        raise NotImplementedError(f"pruning method {self.name!r} does not implement select")

    def reduce(self, features: Tensor, projected: Tensor, k: int, *, projector: nn.Module,
               grid: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """(tokens (B, k', d_l), indices (B, k')) for a batch of units of equal size: by default the
        selected tokens in original order and their sorted indices."""
        picks = self.select(features, projected, k, projector=projector).sort(dim=-1).values
        return projected.gather(1, picks[..., None].expand(-1, -1, projected.shape[-1])), picks

    def attach(self, adapter):
        return ProjectorAttachment(self, adapter)


class ProjectorAttachment(Attachment):
    def prepare(self, inputs, images):
        adapter, method = self.adapter, self.method
        with torch.no_grad():
            units = adapter.encode(inputs)

            def run(rows, k):
                grid = units.grids[rows[0]] if units.grids else None
                return method.reduce(units.stack("features", rows), units.stack("projected", rows), k,
                                     projector=adapter.sensitivity_projector, grid=grid)

            features, indices = _run_groups(units, run)
        features, self.kept_indices = adapter.assemble(inputs, units, features, indices)
        return features

    def timed_calls(self):
        calls = [(self.method, "reduce", "selection")]
        if callable(getattr(self.method, "sensitivity", None)):
            calls.append((self.method, "sensitivity", "sensitivity"))
        return calls


# ------------------------------------------------------------------ vision stage


@dataclass
class VisionMethod(PruningMethod):
    """Acts inside the vision encoder: ``capture(attention)`` records what it needs from the
    encoder's feature layer (a context manager yielding a dict), ``merge(hidden, record, rows, k)``
    returns (tokens (B, k, d_v) for the projector, indices (B, k'))."""

    kind: ClassVar[str] = "vision"

    def capture(self, attention: nn.Module):
        raise NotImplementedError

    def merge(self, hidden: Tensor, record: dict, rows: list[int], k: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def attach(self, adapter):
        adapter.check_feature_layer(self)
        return VisionAttachment(self, adapter)


class VisionAttachment(Attachment):
    def prepare(self, inputs, images):
        adapter, method = self.adapter, self.method
        with torch.no_grad():
            with method.capture(adapter.feature_layer_attention(inputs)) as record:
                units = adapter.encode(inputs, tower_hidden=True)

            def run(rows, k):
                tokens, indices = method.merge(units.stack("tower_hidden", rows), record, rows, k)
                return adapter.projector(tokens), indices

            features, indices = _run_groups(units, run)
        features, self.kept_indices = adapter.assemble(inputs, units, features, indices)
        return features

    def timed_calls(self):
        return [(self.method, "merge", "selection")]


# ------------------------------------------------------------------ LLM stage


@dataclass
class LLMMethod(PruningMethod):
    """Drops visual tokens inside the decoder. ``hooks(language_model, layers)`` returns an object
    with ``arm(images, length, key_mask)`` (per prompt: for each image its batch row, placeholder
    columns and budget k), ``remove()`` and ``kept_indices``."""

    kind: ClassVar[str] = "llm"

    def hooks(self, language_model: nn.Module, layers: nn.ModuleList):
        raise NotImplementedError

    def attach(self, adapter):
        return LLMAttachment(self, adapter)


class LLMAttachment(Attachment):
    def __init__(self, method, adapter):
        super().__init__(method, adapter)
        self.hooks = method.hooks(adapter.language_model, adapter.decoder_layers)

    @property
    def kept_indices(self):
        return self.hooks.kept_indices

    @kept_indices.setter
    def kept_indices(self, value):
        pass  # the hooks record them during the prefill

    def prepare(self, inputs, images):
        counts = [len(columns) for _, columns in images]
        budgets = self.adapter.image_budgets(inputs, counts)
        self.hooks.arm([(row, columns, k) for (row, columns), k in zip(images, budgets)],
                       inputs["input_ids"].shape[1], inputs.get("attention_mask"))
        return None

    def remove(self):
        self.hooks.remove()

    def timed_calls(self):
        # the ranking at the pruning layers and the drop (with any merge of the dropped tokens), inside the decoder
        return [(self.hooks, name, "selection") for name in ("choose", "_apply") if hasattr(self.hooks, name)]
