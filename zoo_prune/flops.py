"""FLOPs ledger: what a pruned prefill costs, counted on the model's own graph.

Every part is counted by :class:`torch.utils.flop_counter.FlopCounterMode` while the model's own
modules run (2 FLOPs per multiply-add of every matmul, convolution and attention product;
elementwise work, norms and softmax are not counted, as in every FLOPs convention of the field):

* ``vision``: the vision tower over the image's patches (all its layers, as the model runs it);
* ``projector``: the multimodal projector over the tokens it receives (all N; a vision-kind method
  such as VisionZip projects only its k tokens);
* ``sensitivity``: the method's zeroth-order sensitivity (``zoo_prune.zo_sensitivity`` with the
  estimator the row names, m = 64), per-model precomputations (SVD, Gram matrix) excluded;
* ``selection``: the method's own choice of tokens given the sensitivities (``method.select``), or
  a vision-kind method's merge (and what a method declares in ``method.flops``);
* ``llm``: the language-model decoder, each layer at the tokens ``method.llm_tokens`` says it sees
  (methods that prune inside the language model, e.g. FastV, see all tokens in early layers).

The paper models are built from their real configurations (``zoo_prune/configs/<name>.json``, each
naming the hub checkpoint it describes) on the ``meta`` device: no weights, no network. Parts whose
code needs concrete values (the estimators' input checks, the greedy selection's argmax) run on
CPU tensors of the real shapes with random values (FLOPs do not depend on values); the estimators'
work is linear in the number of tokens, so they are counted on a few tokens and extrapolated
exactly (checked on a third count).

    from zoo_prune.flops import Ledger
    ledger = Ledger.paper("llava-1.5-7b")
    ledger.parts(get_method("divprune"), keep=64, text_tokens=60)   # {"vision": ..., "llm": ...}
    rows = ledger.rows([192, 128, 64], text_tokens=60)              # every method x budget x part
"""

from __future__ import annotations

import copy
import dataclasses
import json
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PARTS = ("vision", "projector", "sensitivity", "selection", "llm")
CONFIG_DIR = Path(__file__).with_name("configs")
SENSITIVITY_M = 64
# Prompt text tokens of one question with the chat template: LLaVA-1.5's prompt for a short VQA
# question is about this long (the FastV / VisionZip papers' FLOPs also assume a few dozen).
DEFAULT_TEXT_TOKENS = 60
UNPRUNED = "unpruned"
# Qwen2.5-VL's resolution is dynamic: the ledger counts one 896 x 896 image (64 x 64 patches of 14
# px, merged 2 x 2 into 1024 tokens), as benchmarks/estimators.py does.
QWEN_IMAGE = (896, 896)


def paper_models() -> list[str]:
    """Names of the model configurations shipped in ``zoo_prune/configs``."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def paper_spec(name: str) -> dict:
    """The JSON of ``zoo_prune/configs/<name>.json``: ``name``, ``hub_id``, ``source``, ``config``."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no model configuration named {name!r}; available: {', '.join(paper_models())}")
    return json.loads(path.read_text())


def paper_config(name: str):
    """The transformers configuration of paper model ``name`` (no download)."""
    from transformers import AutoConfig

    config = dict(paper_spec(name)["config"])
    return AutoConfig.for_model(config.pop("model_type"), **config)


def meta_model(config) -> nn.Module:
    """The image-text-to-text model of ``config`` on the meta device: shapes only, no weights."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def count(call, *args, **kwargs) -> int:
    """FLOPs (2 per multiply-add) of ``call(*args, **kwargs)`` as FlopCounterMode counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call(*args, **kwargs)
    return int(counter.get_total_flops())


def _on_cpu(module: nn.Module, seed: int = 0) -> nn.Module:
    """A CPU float32 copy of ``module`` (meta or not) with random weights of the real shapes."""
    copy_ = copy.deepcopy(module).to_empty(device="cpu").float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copy_.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        for buffer in copy_.buffers():
            if buffer.is_floating_point():
                buffer.zero_()
    return copy_


def _linear_in_tokens(counter, tokens: int, probes: tuple[int, int, int] = (2, 4, 6)) -> int:
    """``counter(n)`` at ``tokens`` from counts at a few small n, for work linear in n (checked)."""
    a, b, c = probes
    fa, fb, fc = counter(a), counter(b), counter(c)
    slope = (fb - fa) // (b - a)
    if fa + slope * (c - a) != fc or (fb - fa) % (b - a):
        raise RuntimeError(f"FLOPs are not linear in the number of tokens ({fa}, {fb}, {fc} at {probes})")
    return fa + slope * (tokens - a)


def _fields(method) -> set[str]:
    return {field.name for field in dataclasses.fields(method)} if dataclasses.is_dataclass(method) else set()


def uses_sensitivity(method) -> bool:
    """Whether ``method`` computes zeroth-order sensitivities (it has an ``estimator`` option)."""
    return "estimator" in _fields(method) and hasattr(method, "sensitivity")


class Ledger:
    """FLOPs of one model's prefill by part, per method and budget (module docstring).

    Build with :meth:`paper` (a shipped configuration, meta device) or :meth:`of` (a loaded model:
    its own configuration is rebuilt on the meta device; only its projector is run, by the estimators).
    """

    def __init__(self, model: nn.Module, name: str = "", image_size: tuple[int, int] | None = None,
                 cpu_projector: nn.Module | None = None):
        """``cpu_projector``: a CPU module of the projector's shapes on which the estimators and the
        selection run (default: a random-weight copy); ``image_size``: Qwen2.5-VL's image (H, W)."""
        self.model = model
        self.config = model.config
        self.name = name or self.config.model_type
        self.family = self.config.model_type
        if self.family not in ("llava", "llava_next", "qwen2_5_vl"):
            raise ValueError(f"the FLOPs ledger knows LLaVA, LLaVA-NeXT and Qwen2.5-VL, not model_type={self.family!r}")
        self.image_size = image_size or QWEN_IMAGE
        self._llm_layer: dict[int, int] = {}
        self._sensitivity: dict[str, int | None] = {}
        self._selection: dict[tuple, int] = {}
        if cpu_projector is not None:
            self.__dict__["cpu_projector"] = cpu_projector

    @classmethod
    def paper(cls, name: str) -> "Ledger":
        return cls(meta_model(paper_config(name)), name)

    @classmethod
    def of(cls, model: nn.Module, name: str = "") -> "Ledger":
        """The ledger of a loaded model, counted on a meta-device copy built from its configuration;
        the estimators and the selection run on the model's own projector when it is on the CPU."""
        projector = cls(model).projector
        on_cpu = all(p.device.type == "cpu" for p in projector.parameters())
        return cls(meta_model(model.config), name, cpu_projector=projector if on_cpu else None)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def inner(self) -> nn.Module:
        return self.model.model

    @property
    def units(self) -> int:
        """Projector units per image: LLaVA-NeXT's 5 patches (the paper's 2880-token image), else 1."""
        return 5 if self.family == "llava_next" else 1

    @property
    def tokens_per_unit(self) -> int:
        if self.family == "qwen2_5_vl":
            vision = self.config.vision_config
            h, w = (s // vision.patch_size // vision.spatial_merge_size for s in self.image_size)
            return h * w
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    @property
    def visual_tokens(self) -> int:
        """Visual tokens of one image reaching an unpruned language model."""
        return self.units * self.tokens_per_unit

    def keep_tokens(self, keep: int | float) -> int:
        """Visual tokens a budget keeps per image (a ratio of the image's tokens, or a count)."""
        from .selection import keep_count

        if isinstance(keep, float):
            return self.units * keep_count(keep, self.tokens_per_unit)
        return keep_count(keep, self.visual_tokens)

    @property
    def projector(self) -> nn.Module:
        """The per-token projector the estimators perturb (Qwen2.5-VL: the merger over 2x2 groups)."""
        if self.family == "qwen2_5_vl":
            from .projector import GroupedProjector

            merge = self.config.vision_config.spatial_merge_size ** 2
            return GroupedProjector(self.inner.visual.merger, group=merge)
        return self.inner.multi_modal_projector

    @property
    def projector_width(self) -> tuple[int, int]:
        """(d_v, d_l): a token's width entering and leaving the projector."""
        if self.family == "qwen2_5_vl":
            vision = self.config.vision_config
            return vision.hidden_size * vision.spatial_merge_size ** 2, vision.out_hidden_size
        projector = self.inner.multi_modal_projector
        return projector.linear_1.in_features, projector.linear_2.out_features

    @property
    def language_model(self) -> nn.Module:
        return self.inner.language_model

    # -- parts ------------------------------------------------------------------------------
    @cached_property
    def vision(self) -> int:
        """The vision tower over one image (every layer it runs)."""
        if self.family == "qwen2_5_vl":
            return self._qwen_vision()
        vision = self.config.vision_config
        pixels = torch.empty(self.units, vision.num_channels, vision.image_size, vision.image_size, device="meta")
        return count(self.inner.vision_tower, pixels, output_hidden_states=True)

    def _qwen_vision(self) -> int:
        """Qwen2.5-VL's tower: its own forward on meta, given the position ids and the window and
        sequence boundaries (which it derives from values) computed on CPU by transformers' helpers."""
        from transformers import vision_utils

        visual, vision = self.inner.visual, self.config.vision_config
        h, w = (s // vision.patch_size for s in self.image_size)
        grid = torch.tensor([[1, h, w]])
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.empty(h * w, patch, device="meta")
        window_index, windows = vision_utils.get_vision_window_index(
            grid, spatial_merge_size=vision.spatial_merge_size, window_size=vision.window_size,
            patch_size=vision.patch_size)
        # positions and the window permutation only shape the result (meta); the boundaries split the
        # attention into windows (concrete, on CPU)
        known = {"position_ids": vision_utils.get_vision_position_ids(grid, vision.spatial_merge_size).to("meta"),
                 "cu_seqlens": vision_utils.get_vision_cu_seqlens(grid),
                 "window_index": window_index.to("meta"), "cu_window_seqlens": windows}
        return count(visual, pixels, grid, **known)

    def projector_flops(self, tokens_per_unit: int) -> int:
        d_v, _ = self.projector_width
        features = torch.empty(self.units, tokens_per_unit, d_v, device="meta")
        return count(self.projector, features)

    @cached_property
    def cpu_projector(self) -> nn.Module:
        """The CPU projector the estimators and the selection run on (real shapes, random weights
        unless given)."""
        return _on_cpu(self.projector)

    def sensitivity(self, estimator: str, m: int = SENSITIVITY_M, rank: int | None = None) -> int | None:
        """One image's sensitivities with ``estimator`` (None if it does not apply to this projector)."""
        from .sensitivity import DEFAULT_RANK, precompute, zo_sensitivity

        rank = DEFAULT_RANK if rank is None else rank
        key = f"{estimator}/{m}/{rank}"
        if key not in self._sensitivity:
            projector = self.cpu_projector
            d_v, _ = self.projector_width
            try:
                precompute(projector, estimator, rank=rank, device="cpu")  # per model, not per image
            except TypeError:  # not Linear-act-Linear: only naive applies
                self._sensitivity[key] = None
                return None
            generator = torch.Generator().manual_seed(0)

            def counter(n: int) -> int:
                features = torch.randn(n, d_v, generator=generator)
                return count(zo_sensitivity, projector, features, m=m, seed=0, estimator=estimator, rank=rank)

            self._sensitivity[key] = self.units * _linear_in_tokens(counter, self.tokens_per_unit)
        return self._sensitivity[key]

    def selection(self, method, keep: int) -> int:
        """The method's own choice of ``keep`` tokens per image, given its sensitivities (random values)."""
        # the estimator does not change the selection's work: one count per other option set
        key = (repr(dataclasses.replace(method, estimator="auto") if uses_sensitivity(method) else method), keep)
        if key not in self._selection:
            self._selection[key] = self._count_selection(method, keep)
        return self._selection[key]

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of a unit's token grid."""
        if self.family == "qwen2_5_vl":
            vision = self.config.vision_config
            return tuple(s // vision.patch_size // vision.spatial_merge_size for s in self.image_size)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return side, side

    def _count_selection(self, method, keep: int) -> int:
        """Counted on CPU tensors of the real shapes (one unit, batch of 1), times the units, plus the
        method's own declared work outside the model's modules (``method.flops``, 0 by default)."""
        kind = method.kind
        per_unit = keep // self.units
        generator = torch.Generator().manual_seed(1)
        n = self.tokens_per_unit
        width = self.config.get_text_config().hidden_size
        declared = int(method.flops(self.visual_tokens, keep, width))
        if kind == "vision":
            if not hasattr(method, "merge"):
                return declared
            vision = self.config.vision_config
            hidden = torch.randn(1, n + 1, vision.hidden_size, generator=generator)
            record = {"cls_attention": torch.rand(1, n, generator=generator),
                      "keys": torch.randn(1, n + 1, vision.hidden_size // vision.num_attention_heads, generator=generator)}
            return self.units * count(method.merge, hidden, record, [0], per_unit) + declared
        if kind != "projector":
            return declared  # methods inside the language model: what they declare (``method.flops``)
        d_v, d_l = self.projector_width
        features = torch.randn(1, n, d_v, generator=generator)
        projected = torch.randn(1, n, d_l, generator=generator)
        chooser = method
        if uses_sensitivity(method):
            scores = torch.rand(1, n, generator=generator)
            chooser = copy.copy(method)
            chooser.sensitivity = lambda features, projector: scores.reshape(features.shape[:-1])  # counted apart
        return self.units * count(chooser.reduce, features, projected, per_unit, projector=self.cpu_projector,
                                  grid=self.grid) + declared

    def llm_layer(self, tokens: int) -> int:
        """One decoder layer over ``tokens`` tokens (attention included, no KV cache before it)."""
        if tokens not in self._llm_layer:
            model = self.language_model
            width = self.config.get_text_config().hidden_size
            hidden = torch.empty(1, tokens, width, device="meta")
            positions = torch.arange(tokens, device="meta")[None]
            if self.family == "qwen2_5_vl":
                positions = positions.expand(3, 1, tokens)
            rope = model.rotary_emb(hidden, positions)
            self._llm_layer[tokens] = count(model.layers[0], hidden, attention_mask=None, position_ids=positions,
                                            position_embeddings=rope)
        return self._llm_layer[tokens]

    def llm(self, per_layer: list[int]) -> int:
        layers = self.config.get_text_config().num_hidden_layers
        if len(per_layer) != layers:
            raise ValueError(f"{len(per_layer)} per-layer token counts for a {layers}-layer language model")
        return sum(self.llm_layer(n) for n in per_layer)

    # -- per method ---------------------------------------------------------------------------
    def supports(self, method) -> bool:
        """Vision-kind methods (VisionZip) need a CLIP-style tower with a CLS token: LLaVA families."""
        return not (method.kind == "vision"
                    and self.family == "qwen2_5_vl")

    def parts(self, method, keep: int | float | None, text_tokens: int = DEFAULT_TEXT_TOKENS,
              estimator: str | None = None) -> dict[str, int]:
        """FLOPs by part of one image's prefill with ``method`` at ``keep`` (None or method None: unpruned).

        ``estimator`` overrides the method's own for sensitivity methods (``estimator="auto"``
        resolves as the method resolves it on this projector)."""
        layers = self.config.get_text_config().num_hidden_layers
        full = self.visual_tokens
        result = dict.fromkeys(PARTS, 0)
        result["vision"] = self.vision
        if method is None or keep is None:
            result["projector"] = self.projector_flops(self.tokens_per_unit)
            result["llm"] = self.llm([text_tokens + full] * layers)
            return result
        if not self.supports(method):
            raise ValueError(f"method {method.name!r} (kind {method.kind!r}) is not supported on {self.name}")
        kept = self.keep_tokens(keep)
        kind = method.kind
        result["projector"] = self.projector_flops(kept // self.units if kind == "vision" else self.tokens_per_unit)
        if uses_sensitivity(method):
            chosen = estimator or method.estimator
            if chosen == "auto":
                chosen = method.resolve_estimator(self.cpu_projector)
            flops = self.sensitivity(chosen, m=method.m, rank=method.rank)
            if flops is None:
                raise ValueError(f"estimator {chosen!r} does not apply to {self.name}'s projector")
            result["sensitivity"] = flops
        result["selection"] = self.selection(method, kept)
        result["llm"] = self.llm(method.llm_tokens(full, kept, text_tokens, layers))
        return result

    def rows(self, budgets, text_tokens: int = DEFAULT_TEXT_TOKENS, methods=None, estimators=None) -> list[dict]:
        """One row per (method, budget, part): ``model, method, keep, text_tokens, part, flops``.

        Methods come from the registry (``available_methods()``) unless given; sensitivity methods
        get one row set per estimator that applies, named ``<method>:<estimator>``."""
        from . import available_methods, get_method
        from .sensitivity import ESTIMATORS

        methods = available_methods() if methods is None else methods
        estimators = ESTIMATORS if estimators is None else estimators
        rows = []

        def add(label, keep, parts):
            rows.extend({"model": self.name, "method": label, "keep": keep, "text_tokens": text_tokens,
                         "part": part, "flops": parts[part]} for part in PARTS)

        add(UNPRUNED, self.visual_tokens, self.parts(None, None, text_tokens))
        for name in methods:
            method = get_method(name)
            if not self.supports(method):
                continue
            variants = [(name, None)]
            if uses_sensitivity(method):
                variants = [(f"{name}:{e}", e) for e in estimators
                            if self.sensitivity(e, m=method.m, rank=method.rank) is not None]
            for budget in budgets:
                for label, estimator in variants:
                    add(label, self.keep_tokens(budget), self.parts(method, budget, text_tokens, estimator))
        return rows


def table(rows: list[dict]) -> str:
    """A markdown table of ledger rows: TFLOPs by part and in total, and the ratio to unpruned."""
    import itertools

    lines = ["| model | method | visual tokens | vision | projector | sensitivity | selection | llm | total | vs unpruned |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    key = lambda row: (row["model"], row["method"], row["keep"])  # noqa: E731
    groups = {k: {r["part"]: r["flops"] for r in g} for k, g in itertools.groupby(rows, key)}
    for (model, method, keep), parts in groups.items():
        total = sum(parts.values())
        base = sum(groups[next(k for k in groups if k[0] == model and k[1] == UNPRUNED)].values())
        cells = " | ".join(f"{parts[p] / 1e12:.3f}" for p in PARTS)
        lines.append(f"| {model} | {method} | {keep} | {cells} | {total / 1e12:.3f} | {total / base:.3f} |")
    return "\n".join(lines)
