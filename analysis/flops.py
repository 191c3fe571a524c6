"""Analytic FLOPs of a LLaVA-style prefill (FastV / VisionZip convention: one multiply-add = 1 FLOP).

A cross-check only: the project's FLOPs come from the ledger ``zoo_prune.flops``, which counts the
models' real graphs (2 FLOPs per multiply-add, all three matrices of LLaMA's gated MLP, the tower);
``benchmarks/flops.py`` puts these formulas beside it and the paper's App. D in one table.

A transformer layer over n tokens of width d with FFN width f costs 4 n d^2 + 2 n^2 d + 2 n d f
(FastV, Chen et al. 2024, Eq. 4; VisionZip uses the same). A prefill is the vision tower over its
patches, the projector over N tokens per patch, pruning's own work, and the language model over
the kept visual tokens plus the prompt's text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


def layer_flops(n: int, d: int, ffn: int, mlp_matrices: int = 2) -> float:
    """One transformer layer over ``n`` tokens (4nd^2 + 2n^2 d + 2ndf); ``mlp_matrices=3`` counts a
    gated MLP's three matrices (4nd^2 + 2n^2 d + 3ndf), as LLaMA has."""
    return 4 * n * d * d + 2 * n * n * d + mlp_matrices * n * d * ffn


@dataclass(frozen=True)
class Dims:
    """Widths of a LLaVA-style model; ``patches`` images the tower sees per input (LLaVA-NeXT: 5)."""

    tower_layers: int
    tower_width: int
    tower_ffn: int
    tokens: int  # visual tokens per patch (N)
    projector: tuple[int, int, int]  # d_v, hidden, d_l
    llm_layers: int
    llm_width: int
    llm_ffn: int
    patches: int = 1


# Public architecture sizes of the paper's models (their config.json files; CLIP ViT-L/14-336 tower).
CLIP_L336 = dict(tower_layers=24, tower_width=1024, tower_ffn=4096, tokens=576)
PAPER_MODELS = {
    "llava-1.5-7b": Dims(**CLIP_L336, projector=(1024, 4096, 4096), llm_layers=32, llm_width=4096, llm_ffn=11008),
    "llava-1.5-13b": Dims(**CLIP_L336, projector=(1024, 5120, 5120), llm_layers=40, llm_width=5120, llm_ffn=13824),
    "llava-next-7b": Dims(**CLIP_L336, projector=(1024, 4096, 4096), llm_layers=32, llm_width=4096, llm_ffn=11008,
                          patches=5),
}


def dims_of(config) -> Dims:
    """:class:`Dims` of a transformers ``LlavaConfig`` (the testbed model)."""
    vision, text = config.vision_config, config.text_config
    n = (vision.image_size // vision.patch_size) ** 2
    return Dims(vision.num_hidden_layers if config.vision_feature_layer == -1 else
                vision.num_hidden_layers + config.vision_feature_layer + 1,
                vision.hidden_size, vision.intermediate_size, n,
                (vision.hidden_size, text.hidden_size, text.hidden_size),
                text.num_hidden_layers, text.hidden_size, text.intermediate_size)


def sensitivity_flops(n: int, m: int, projector: tuple[int, int, int], estimator: str = "fused", rank: int = 128) -> float:
    """FLOPs of one image's (or patch's) sensitivities with ``zoo_prune``'s estimators (README table):
    ``naive`` 2 N m projector calls; ``fused`` the first layer once for X and the m directions, the
    second on the N m differences; ``lowrank`` the same on rank-``rank`` factors; ``closed_form``
    one d_h x d_h quadratic form per token (the Gram matrix is precomputed once per model)."""
    d_v, d_h, d_l = projector
    if estimator == "naive":
        return 2 * n * m * (d_v * d_h + d_h * d_l)
    if estimator == "fused":
        return (n + m) * d_v * d_h + n * m * d_h * d_l
    if estimator == "lowrank":
        return (n + m) * rank * (d_v + d_h) + n * m * rank * d_h
    if estimator == "closed_form":
        return n * (d_v * d_h + d_h * d_h)
    raise ValueError(f"unknown estimator {estimator!r}; choose naive, fused, lowrank or closed_form")


def prefill_flops(dims: Dims, kept: int, text_tokens: int, method: str = "unpruned", m: int = 64,
                  estimator: str = "fused", rank: int = 128) -> dict[str, float]:
    """FLOPs of one prefill by part: ``vision``, ``projector``, ``pruning`` (selection and, for the
    sensitivity methods, :func:`sensitivity_flops` per patch), ``llm``.

    ``kept`` is the number of visual tokens reaching the language model (all patches together).
    """
    n = dims.tokens
    d_v, d_h, d_l = dims.projector
    parts = {
        "vision": dims.patches * dims.tower_layers * layer_flops(n + 1, dims.tower_width, dims.tower_ffn),
        "projector": dims.patches * n * (d_v * d_h + d_h * d_l),
        "pruning": 0.0,
        "llm": dims.llm_layers * layer_flops(kept + text_tokens, dims.llm_width, dims.llm_ffn),
    }
    if method in ("zoo", "sum_fusion", "sensitivity_only"):
        parts["pruning"] += dims.patches * sensitivity_flops(n, m, dims.projector, estimator, rank)
    if method in ("zoo", "sum_fusion", "divprune"):  # cosine rows of the chosen tokens
        parts["pruning"] += dims.patches * n * (kept / dims.patches) * d_l
    if method == "fastv":  # layers before K = 2 see every token
        full = dims.patches * n + text_tokens
        parts["llm"] = 2 * layer_flops(full, dims.llm_width, dims.llm_ffn) + \
            (dims.llm_layers - 2) * layer_flops(kept + text_tokens, dims.llm_width, dims.llm_ffn)
    parts["total"] = sum(parts.values())
    return parts


def _paper_app_d() -> dict[tuple[str, int], float]:
    from .paper import paper_numbers

    numbers = paper_numbers()
    app_d = numbers[numbers["table"] == "appD"]
    return {(method, keep): value for method, keep, value in zip(app_d["method"], app_d["keep"], app_d["value"])}


# The paper's App. D (LLaVA-NeXT-7B, TFLOPs; analysis/paper_numbers.csv) for the formula check only; never plotted as ours.
PAPER_APP_D = _paper_app_d()
