"""SparseVLM (Zhang et al., ICML 2025) as method.md section 4 fixes it: text-guided pruning inside
the language model, with the recycling of v1.5 (official code: Gumpest/SparseVLMs, branch v1.5).

1. Raters. When the prompt enters the language model, each image's visual embeddings V (n, D) and
   the embeddings T (t, D) of the text tokens after it give the relevance softmax_t(V T^T)
   averaged over the n visual tokens; the text tokens whose relevance is above its mean are the
   image's raters (all of them when none is above, e.g. a single text token).
2. Pruning. In decoder layers 2, 6 and 15 (0-based; the official ``pruning_loc``) the visual tokens
   are scored by the raters' softmax attention rows in that layer, averaged over heads and raters;
   the top ``b_s`` stay from the next layer on (layers 0-2 see every visual token). Only the
   raters' rows are computed (from the layer's own q/k projections and rotary function), so the
   model keeps its SDPA or eager attention.
3. Recycling. Of the tokens pruned at a layer, the 30% + 1 with the highest scores are clustered
   by density-peak kNN clustering into m // 10 + 1 clusters (:func:`density_peak_merge`), each
   averaged into one token that is inserted after the image's kept tokens (taking the position of
   its last placeholder); recycled tokens count as visual tokens at the next pruning layer.

Budgets. For 192 / 128 / 64 of 576 tokens the per-layer budgets are those of the official code,
(300, 200, 110) / (303, 110, 36) / (66, 30, 17): the layer-averaged count that the paper reports
(the visual tokens each layer passes on, averaged over the 32 layers) is then 192.0 / 128.6 / 64.8.
Another budget k of n visual tokens (the testbed's 48 / 32 / 16 of 144, LLaVA-NeXT's per-image
budgets) uses the schedule whose k / n is nearest, scaled by k / its k (so 48 of 144 gives
75, 50, 28), each at most n; a layer whose budget is not below its visual-token count prunes
nothing, and keep >= n prunes nothing at all (so keep = all is the unpruned model; the official
code always drops at least one).

Depth. Pruning layers beyond a small model's depth are clipped to its last layer but one (the
last whose output still reaches a layer): on the 3-layer testbed and tiny models all three fall
on layer 1, and stages that fall on one layer act as one, with the last one's budget.

Reported counts: ``handle.attachment.hooks.tokens_per_layer`` (per image, the visual tokens entering each
decoder layer, recycled ones included) and ``.average_tokens`` (the paper's layer average);
:meth:`SparseVLM.llm_tokens` gives the same per-layer counts for the FLOPs ledger.

Deviations from the official code, all for batches and exactness: every image of a batch is pruned
with its own raters, budgets and clusters (the official code assumes batch size 1); kept tokens keep
their own positions (v1.5 renumbers them; v2 offers keeping them), which M-RoPE needs; density
ties go to the lower index instead of random noise; a cluster token is the plain mean of its members.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_int
from .base import LLMMethod, register_method
from .llm_pruning import Decision, DecoderPruning

REFERENCE_TOKENS = 576
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}  # v1.5 sparse_token_list_*
RECYCLE_FRACTION = 0.3
CLUSTER_DIVISOR = 10


@register_method("sparsevlm")
@dataclass
class SparseVLM(LLMMethod):
    """SparseVLM v1.5: text raters' attention prunes visual tokens after ``layers``, pruned ones recycled.

    ``layers``: the 0-based decoder layers whose raters' attention prunes (the next layer on sees
    the kept tokens); clipped to a shallower model (see the module docstring). ``recycle``: insert
    the cluster tokens of v1.5 (False: plain pruning).
    """

    layers: tuple[int, ...] = (2, 6, 15)
    recycle: bool = True

    def __post_init__(self):
        self.layers = tuple(self.layers)
        for layer in self.layers:
            check_int("layers", layer, minimum=0)
        if len(self.layers) != len(next(iter(SCHEDULES.values()))) or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"SparseVLM layers={self.layers} must be {len(next(iter(SCHEDULES.values())))} increasing layer indices")
        if not isinstance(self.recycle, bool):
            raise TypeError(f"SparseVLM recycle must be True or False, got {self.recycle!r}")

    def budgets(self, visual: int, keep: int) -> list[int]:
        """Visual tokens kept at each pruning layer for a budget of ``keep`` of ``visual`` tokens."""
        check_int("visual", visual)
        check_int("keep", keep)
        if keep >= visual:
            return [visual] * len(next(iter(SCHEDULES.values())))
        scaled = keep * REFERENCE_TOKENS / visual
        reference = min(SCHEDULES, key=lambda k: abs(k - scaled))
        return [min(visual, max(1, int(b * keep / reference + 0.5))) for b in SCHEDULES[reference]]

    def schedule(self, visual: int, keep: int, n_layers: int) -> list[tuple[int, int]]:
        """(pruning layer, budget) pairs for an ``n_layers`` decoder: layers clipped to
        ``n_layers - 2``, stages on one layer merged into the last one's budget."""
        if n_layers < 2:
            raise ValueError(f"SparseVLM needs a language model of at least 2 layers to prune inside, got {n_layers}")
        merged = {}
        for layer, budget in zip(self.layers, self.budgets(visual, keep)):
            merged[min(layer, n_layers - 2)] = budget
        return sorted(merged.items())

    def visual_tokens(self, visual: int, keep: int, layers: int) -> list[int]:
        """Visual tokens entering each of ``layers`` decoder layers (recycled ones included)."""
        counts, current = [], visual
        stages = dict(self.schedule(visual, keep, layers))
        for layer in range(layers):
            counts.append(current)
            budget = stages.get(layer)
            if budget is not None and budget < current:
                current = budget + (cluster_count(recycled_count(current - budget)) if self.recycle else 0)
        return counts

    def llm_tokens(self, visual: int, keep: int, text: int, layers: int) -> list[int]:
        """Every token up to the first pruning layer, then the kept and recycled ones."""
        return [text + n for n in self.visual_tokens(visual, keep, layers)]

    def hooks(self, language_model: nn.Module, layers: nn.ModuleList) -> "SparseVLMHooks":
        """The hooks that prune inside ``language_model`` (its decoder ``layers``), armed per prompt."""
        return SparseVLMHooks(language_model, layers, self)


def recycled_count(pruned: int) -> int:
    """How many of ``pruned`` tokens are recycled: the top 30%, plus one (v1.5)."""
    return int(pruned * RECYCLE_FRACTION) + 1


def cluster_count(recycled: int) -> int:
    """How many cluster tokens ``recycled`` tokens become (v1.5: one per ten, plus one)."""
    return recycled // CLUSTER_DIVISOR + 1


def density_peak_merge(tokens: Tensor, clusters: int) -> Tensor:
    """(clusters, D): ``tokens`` (m, D) grouped by density-peak kNN clustering and averaged (v1.5).

    Distances are Euclidean over sqrt(D); a token's density is exp(-mean squared distance to its
    ``clusters`` nearest tokens, itself included); its parent distance is that to the nearest denser
    token (the largest distance for the densest; equal densities, as two mutual nearest neighbours
    have, count the lower index as denser where the official code adds 1e-6 random noise); the ``clusters`` tokens with the largest
    density x parent distance are centres, in that order, and every token joins its nearest centre.
    Computed in float32 (float64 for float64 tokens).
    """
    x = tokens.float() if tokens.dtype != torch.float64 else tokens
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[-1] ** 0.5  # exactly symmetric
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    index = torch.arange(len(x), device=x.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    parent = torch.where(denser, distance, distance.max()).min(dim=-1).values
    centres = (parent * density).topk(clusters).indices
    assignment = distance[centres].argmin(dim=0)
    assignment[centres] = torch.arange(clusters, device=x.device)
    sums = x.new_zeros(clusters, x.shape[-1]).index_add_(0, assignment, x)
    counts = torch.bincount(assignment, minlength=clusters).to(x.dtype)
    return (sums / counts[:, None]).to(tokens.dtype)


class SparseVLMHooks(DecoderPruning):
    """Forward hooks that run SparseVLM inside a decoder stack (see the module docstring)."""

    def __init__(self, language_model: nn.Module, layers: nn.ModuleList, method: SparseVLM):
        self.method = method
        self.schedule_layers = [layer for layer, _ in method.schedule(REFERENCE_TOKENS, REFERENCE_TOKENS, len(layers))]
        super().__init__(language_model, layers, self.schedule_layers)
        self.raters = None

    def begin(self, inputs_embeds: Tensor) -> None:
        """Each image's raters: prompt columns of the text after it whose relevance is above the mean."""
        self.raters, self._budgets = [], []
        images = self.images
        visual = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        for row, columns, _ in images:
            visual[row, columns] = True
        for row, columns, k in images:
            text = ~visual[row]
            text[: int(columns.max()) + 1] = False
            if self._key_mask is not None:
                text &= self._key_mask[row]
            text = text.nonzero()[:, 0]
            if len(text) == 0:
                raise ValueError(f"SparseVLM needs text after each image to choose its raters; the image in row {row} ends its prompt")
            v = inputs_embeds[row, columns].float()
            t = inputs_embeds[row, text].float()
            relevance = (v @ t.T).softmax(dim=-1).mean(dim=0)
            above = relevance > relevance.mean()
            self.raters.append(text[above] if bool(above.any()) else text)
            self._budgets.append(dict(self.method.schedule(len(columns), k, self.n_layers)))

    def choose(self, stage, attention, hidden, position_embeddings):
        layer = self.rank_layers[stage]
        rows = sorted({row for row, _, _ in self.images})
        slots = {row: [] for row in rows}
        for i, (row, _, _) in enumerate(self.images):
            slots[row].append(self.slot_of(row, self.raters[i]))
        width = max(sum(len(s) for s in slots[row]) for row in rows)
        queries = torch.full((hidden.shape[0], width), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
        spans = {}
        for row in rows:
            start = 0
            for i, s in zip([i for i, image in enumerate(self.images) if image[0] == row], slots[row]):
                queries[row, start : start + len(s)] = s.to(hidden.device)
                spans[i] = (start, start + len(s))
                start += len(s)
        attention_of_raters = self.rows(attention, hidden, position_embeddings, queries)  # (B, Q, L)
        decisions = []
        for i, (row, _, _) in enumerate(self.images):
            visual = self.visual_slots(i).to(attention_of_raters.device)
            start, end = spans[i]
            scores = attention_of_raters[row, start:end][:, visual].mean(dim=0)
            budget = self._budgets[i][layer]
            if budget >= len(visual):
                decisions.append(Decision(torch.arange(len(visual), device=visual.device)))
                continue
            order = scores.argsort(descending=True)
            keep, pruned = order[:budget].sort().values, order[budget:]
            recycle = pruned[: recycled_count(len(pruned))] if self.method.recycle else None
            decisions.append(Decision(keep, recycle))
        return decisions

    def recycle(self, tokens: Tensor) -> Tensor:
        return density_peak_merge(tokens, cluster_count(len(tokens)))
