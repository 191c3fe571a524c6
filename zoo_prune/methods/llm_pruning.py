"""Dropping visual tokens inside a language model: the mechanics that FastV and SparseVLM share.

A method that prunes inside the decoder ranks the visual tokens by attention in some layer p and,
from layer p + 1 on, only the kept ones remain (plus, for SparseVLM, a few recycled tokens): their
hidden states, rotary position embeddings (every token keeps its own position), attention-mask
rows and columns and, in the KV cache of those layers, their keys and values. Layers before the
first pruning layer keep every token. :class:`DecoderPruning` does this with forward pre-hooks on
the decoder layers and on the ranking layers' attention modules, armed per prompt by
``apply_pruning`` (which knows where each image's tokens are) and reset whenever the language
model starts a new sequence; a subclass only says which tokens to keep (:meth:`choose`) and, if it
recycles, what tokens to insert (:meth:`recycle`).

Attention rows are computed from the layer's own q/k projections and rotary function
(:func:`attention_rows`), only for the queries that rank (FastV: the last prompt token; SparseVLM:
its text raters), so the model keeps its attention implementation (SDPA or eager) throughout.

Rows of a batch may keep different numbers of tokens (images of different sizes, budgets, recycled
counts): shorter rows are left-padded with empty slots that no token attends to (each attends only
to itself, so its values stay finite), so that the last column is every row's last prompt token.
An inserted (recycled) token sits right after its image's kept tokens and takes the position and
mask column of the image's last placeholder; tokens that share a column see each other in sequence
order, exactly as a causal mask over the pruned sequence would. A cache entry per layer is what
``DynamicCache`` (the default) keeps; static or sliding-window caches and FlashAttention's 2-D
masks are not supported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def attention_rows(attention: nn.Module, hidden: Tensor, position_embeddings, queries: Tensor, visible: Tensor) -> Tensor:
    """(B, Q, L) float32: softmax attention of the query columns ``queries`` (B, Q) over all L keys,
    averaged over heads; ``visible`` (B, Q, L) says which keys each query sees.

    ``attention`` is a Llama-style module (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``) and
    ``hidden`` its input (after the layer's input norm); its model's ``apply_rotary_pos_emb``
    rotates queries and keys with ``position_embeddings`` (cos, sin), as the module itself does.
    """
    batch, length, width = hidden.shape
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    cos, sin = (t.expand(batch, *t.shape[1:]) for t in position_embeddings)
    picked = hidden.gather(1, queries[..., None].expand(-1, -1, width))
    query = attention.q_proj(picked).view(batch, queries.shape[1], -1, attention.head_dim).transpose(1, 2)
    keys = attention.k_proj(hidden).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    query = rotate(query, query, gather_columns(cos, queries, 1), gather_columns(sin, queries, 1))[0].float()
    keys = rotate(keys, keys, cos, sin)[1].float()
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)  # grouped-query attention
    scores = (query @ keys.transpose(-1, -2)) * attention.scaling  # (B, H, Q, L)
    scores = scores.masked_fill(~visible[:, None].to(scores.device), float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


def last_token_attention(attention: nn.Module, hidden: Tensor, position_embeddings, key_mask: Tensor | None) -> Tensor:
    """(B, L): softmax attention of the last query over all keys, averaged over heads, in float32;
    ``key_mask`` (B, L) hides padding (see :func:`attention_rows`)."""
    batch, length, _ = hidden.shape
    queries = torch.full((batch, 1), length - 1, dtype=torch.long, device=hidden.device)
    visible = torch.ones(batch, 1, length, dtype=torch.bool, device=hidden.device)
    if key_mask is not None:
        visible = visible & key_mask[:, None, :].bool().to(hidden.device)
    return attention_rows(attention, hidden, position_embeddings, queries, visible)[:, 0]


def gather_columns(tensor: Tensor, index: Tensor, dim: int) -> Tensor:
    """``tensor`` (batch first, possibly broadcast over it) taken at ``index`` (B, n) along ``dim``."""
    dim, index = dim % tensor.dim(), index.to(tensor.device)
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    view = [index.shape[0]] + [1] * (tensor.dim() - 1)
    view[dim] = index.shape[1]
    size = list(tensor.shape)
    size[dim] = index.shape[1]
    return tensor.gather(dim, index.view(view).expand(size))


@dataclass
class Decision:
    """What one image keeps at one pruning layer: ``keep``, indices into its current visual tokens
    (sorted); ``recycle``, indices of pruned ones whose hidden states :meth:`DecoderPruning.recycle`
    turns into inserted tokens (None: none)."""

    keep: Tensor
    recycle: Tensor | None = None


@dataclass
class _Stage:
    """The pruned sequence from layer ``first`` on: per slot its prompt column (``source``) and
    whether it holds a token (``real``; False for padding slots)."""

    first: int
    source: Tensor  # (B, L')
    real: Tensor  # (B, L') bool
    visual: Tensor  # (B, L') bool: an image's token (kept or recycled)
    masks: dict = field(default_factory=dict)  # the prefill's pruned mask, per model mask (a stage's layers share it)


class DecoderPruning:
    """Hooks on a decoder stack that drop visual tokens after the layers ``rank_layers``.

    ``rank_layers``: sorted distinct 0-based layers; at each, :meth:`choose` ranks with that layer's
    attention (its attention module's input) and the choice takes effect from the next layer on.
    ``arm(images, length, key_mask)`` is called once per prompt with, for every image, its batch
    row, the columns of its visual tokens and its budget k. The next sequence that the language
    model starts (empty cache) is pruned if it has that length (a batch that ``generate`` expanded,
    for beams or several returned sequences, prunes every copy of a prompt as the prompt; the counts
    below then list every copy). Afterwards ``kept_indices`` lists
    per image the indices (into its visual tokens, sorted) of the original tokens still present in
    the last layer, ``tokens_per_layer`` per image the visual tokens entering each decoder layer
    (recycled ones included) and ``average_tokens`` per image the visual tokens each layer passes
    on, averaged over layers (the count that SparseVLM's tables report).
    """

    def __init__(self, language_model: nn.Module, layers: nn.ModuleList, rank_layers: Sequence[int]):
        rank_layers = list(rank_layers)
        if not rank_layers or rank_layers != sorted(set(rank_layers)) or not 0 <= rank_layers[0] <= rank_layers[-1] < len(layers) - 1:
            raise ValueError(f"pruning layers {rank_layers} must be distinct, increasing and lie in [0, {len(layers) - 2}] "
                             f"for a {len(layers)}-layer language model")
        self.rank_layers, self.n_layers = rank_layers, len(layers)
        self.armed = None
        self.kept_indices = self._tokens = None
        self._reset()
        self._handles = [language_model.register_forward_pre_hook(self._start, with_kwargs=True)]
        for stage, p in enumerate(rank_layers):
            hook = lambda module, args, kwargs, stage=stage: self._rank(stage, module, args, kwargs)  # noqa: E731
            self._handles.append(layers[p].self_attn.register_forward_pre_hook(hook, with_kwargs=True))
        for i in range(rank_layers[0] + 1, len(layers)):
            hook = lambda module, args, kwargs, i=i: self._layer(i, args, kwargs)  # noqa: E731
            self._handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))

    # -- what subclasses provide ----------------------------------------------------------------
    def begin(self, inputs_embeds: Tensor) -> None:
        """Called when an armed prompt enters the language model, with its input embeddings."""

    def choose(self, stage: int, attention: nn.Module, hidden: Tensor, position_embeddings) -> list[Decision]:
        """Per image, what it keeps after the ``stage``-th pruning layer (see :meth:`rows`)."""
        raise NotImplementedError

    def recycle(self, tokens: Tensor) -> Tensor:
        """(c, D) tokens to insert after an image's kept ones, from its recycled hidden states (m, D)."""
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------------------
    def arm(self, images: list[tuple[int, Tensor, int]], length: int, key_mask: Tensor | None) -> None:
        self.armed = (images, length, key_mask)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def tokens_per_layer(self) -> list[list[int]] | None:
        return None if self._tokens is None else [list(t) for t in self._tokens]

    @property
    def average_tokens(self) -> list[float] | None:
        if self._tokens is None:
            return None
        return [sum(t[1:] + t[-1:]) / len(t) for t in self._tokens]

    # -- helpers for subclasses -----------------------------------------------------------------
    @property
    def images(self) -> list[tuple[int, Tensor, int]]:
        """(row, original columns, budget k) of each image of the running prompt."""
        return self._images

    def visual_slots(self, image: int) -> Tensor:
        """Current columns (in the running, possibly pruned sequence) of an image's visual tokens."""
        return self._visual[image]

    def slot_of(self, row: int, columns: Tensor) -> Tensor:
        """Current columns of the text prompt columns ``columns`` of batch row ``row`` (text is never dropped)."""
        if not self._stages:
            return columns
        stage = self._stages[-1]
        lookup = torch.full((self._length,), -1, dtype=torch.long, device=stage.source.device)
        text = stage.real[row] & ~stage.visual[row]
        lookup[stage.source[row][text]] = text.nonzero()[:, 0]
        return lookup[columns.to(lookup.device)]

    def rows(self, attention: nn.Module, hidden: Tensor, position_embeddings, queries: Tensor) -> Tensor:
        """(B, Q, L): head-averaged attention of the current columns ``queries`` (B, Q) in this layer,
        each over the keys it sees (causal, padding hidden)."""
        source, real = self._current()
        queries = queries.to(source.device)
        q_source, k_source = source.gather(1, queries), source
        slot = torch.arange(source.shape[1], device=source.device)
        visible = (k_source[:, None, :] < q_source[:, :, None]) | (
            (k_source[:, None, :] == q_source[:, :, None]) & (slot[None, None, :] <= queries[:, :, None]))
        visible &= real[:, None, :]
        if self._key_mask is not None:
            visible &= self._key_mask.to(source.device).gather(1, k_source)[:, None, :]
        return attention_rows(attention, hidden, position_embeddings, queries.to(hidden.device), visible)

    # -- hooks ----------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._active = self._prefill = False
        self._stages, self._pending = [], {}

    def _current(self) -> tuple[Tensor, Tensor]:
        if self._stages:
            return self._stages[-1].source, self._stages[-1].real
        return self._source0, torch.ones_like(self._source0, dtype=torch.bool)

    def _start(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:  # a step of the running sequence
            self._prefill = self._active = False
            return None
        armed, self.armed = self.armed, None
        self._reset()
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(kwargs.get("input_ids", args[0] if args else None))
        if armed is None or embeds.shape[1] != armed[1]:
            return None
        images, length, key_mask = armed
        batch, device = embeds.shape[0], embeds.device
        prompts = key_mask.shape[0] if key_mask is not None else max(row for row, _, _ in images) + 1
        if batch != prompts:  # generate expanded each prompt into consecutive rows (beams, return sequences)
            if batch % prompts:
                return None
            copies = batch // prompts
            images = [(row * copies + j, columns, k) for row, columns, k in images for j in range(copies)]
            key_mask = None if key_mask is None else key_mask.repeat_interleave(copies, dim=0)
        self._images = [(row, columns.to(device), k) for row, columns, k in images]
        self._length = length
        self._key_mask = None if key_mask is None else key_mask.bool().to(device)
        self._source0 = torch.arange(length, device=device).expand(batch, -1)
        self._visual = [columns for _, columns, _ in self._images]
        self._origin = [torch.arange(len(columns), device=device) for _, columns, _ in self._images]
        self._tokens = [[len(columns)] * self.n_layers for _, columns, _ in self._images]
        self.kept_indices = [o.clone() for o in self._origin]
        self._active = self._prefill = True
        self.begin(embeds)
        return None

    def _rank(self, stage, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not self._active or hidden.shape[1] != self._current()[0].shape[1]:
            return None
        decisions = self.choose(stage, module, hidden, kwargs["position_embeddings"])
        self._pending[self.rank_layers[stage] + 1] = decisions
        return None

    def _layer(self, index, args, kwargs):
        if not self._stages and index not in self._pending:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if index in self._pending:  # the first layer after a pruning layer, in the prefill
            hidden = self._apply(index, hidden, self._pending.pop(index))
        stage = [s for s in self._stages if s.first <= index][-1]
        cos, sin = kwargs["position_embeddings"]
        mask = kwargs.get("attention_mask")
        if self._prefill:
            kwargs["position_embeddings"] = (gather_columns(cos, stage.source, 1), gather_columns(sin, stage.source, 1))
            if isinstance(kwargs.get("position_ids"), Tensor):
                kwargs["position_ids"] = gather_columns(kwargs["position_ids"], stage.source, -1)
            key = None if mask is None else id(mask)
            if key not in stage.masks:
                stage.masks[key] = (mask, _prefill_mask(mask, stage.source, stage.real, self._key_mask))  # holds mask: ids stay unique
            kwargs["attention_mask"] = stage.masks[key][1]
        else:
            cache = kwargs.get("past_key_values")
            keys = (cache.get_seq_length(index) if cache is not None else stage.source.shape[1]) + hidden.shape[1]
            kwargs["attention_mask"] = _decode_mask(mask, stage.source, stage.real, self._length, keys, hidden.shape[1])
        return (hidden, *args[1:]), kwargs

    def _apply(self, first: int, hidden: Tensor, decisions: list[Decision]) -> Tensor:
        """The hidden states of the sequence pruned by ``decisions``; records the new stage."""
        source, real = self._current()
        batch, length, width = hidden.shape
        device = hidden.device
        keep = real.to(device).clone()
        extras = [None] * len(self._images)
        for i, ((row, _, _), decision) in enumerate(zip(self._images, decisions)):
            slots = self._visual[i].to(device)
            keep[row, slots] = False
            keep[row, slots[decision.keep.to(device)]] = True
            if decision.recycle is not None and len(decision.recycle):
                extras[i] = self.recycle(hidden[row, slots[decision.recycle.to(device)]]).to(hidden.dtype)
        # per row: the current columns kept, in order, each image's inserted tokens right after its block
        rows, visual, origin = [], [None] * len(self._images), [None] * len(self._images)
        for r in range(batch):
            kept = keep[r].nonzero()[:, 0]
            index, tokens, start = [], [], 0
            for i in sorted((i for i, image in enumerate(self._images) if image[0] == r), key=lambda i: int(self._visual[i].max())):
                slots = self._visual[i].to(device)
                end = int(slots.max()) + 1
                block = kept[(kept >= start) & (kept < end)]
                offset = sum(len(piece) for piece in index)
                in_image = torch.isin(block, slots).nonzero()[:, 0] + offset
                index.append(block)
                tokens.append(hidden[r, block])
                n_extra = 0 if extras[i] is None else len(extras[i])
                if n_extra:  # an insert takes the column of the image's last slot: marked -(slot + 1)
                    index.append(torch.full((n_extra,), -end, dtype=torch.long, device=device))
                    tokens.append(extras[i])
                visual[i] = torch.cat([in_image, torch.arange(n_extra, device=device) + offset + len(block)])
                kept_origin = self._origin[i][decisions[i].keep.to(self._origin[i].device)]
                origin[i] = torch.cat([kept_origin, kept_origin.new_full((n_extra,), -1)])
                start = end
            index.append(kept[kept >= start])
            tokens.append(hidden[r, index[-1]])
            rows.append((torch.cat(index), torch.cat(tokens)))
        new_length = max(len(index) for index, _ in rows)
        new_hidden = hidden.new_zeros(batch, new_length, width)
        new_source = torch.zeros(batch, new_length, dtype=torch.long, device=device)
        new_real = torch.zeros(batch, new_length, dtype=torch.bool, device=device)
        for r, (index, tokens) in enumerate(rows):
            pad = new_length - len(index)
            new_hidden[r, pad:] = tokens
            new_source[r, pad:] = source[r].to(device)[torch.where(index < 0, -index - 1, index)]
            new_real[r, pad:] = True
        self._visual = [v + new_length - len(rows[row][0]) for v, (row, _, _) in zip(visual, self._images)]
        self._origin = origin
        counts = [len(v) for v in visual]
        is_visual = torch.zeros_like(new_real)
        for v, (row, _, _) in zip(self._visual, self._images):
            is_visual[row, v] = True
        self._stages.append(_Stage(first, new_source, new_real, is_visual))
        for tokens, n in zip(self._tokens, counts):
            tokens[first:] = [n] * (self.n_layers - first)
        self.kept_indices = [o[o >= 0] for o in origin]
        return new_hidden


def _allowed_in_format(allowed: Tensor, like: Tensor | None) -> Tensor:
    """(B, 1, Q, K) ``allowed`` as the model's mask format: bool, or additive float."""
    if like is None or like.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(~allowed.to(like.device), torch.finfo(like.dtype).min)


def _prefill_mask(mask: Tensor | None, source: Tensor, real: Tensor, key_mask: Tensor | None) -> Tensor | None:
    """The (B, 1, L', L') mask of a pruned prompt: causal by prompt column, ties in sequence order,
    padding slots seen by none and seeing only themselves."""
    if mask is None and bool(real.all()):
        return None  # the pruned sequence is in column order: SDPA's own causal mask is exact
    slot = torch.arange(source.shape[1], device=source.device)
    query, key = source[:, :, None], source[:, None, :]
    allowed = ((key < query) | ((key == query) & (slot[None, None, :] <= slot[None, :, None]))) & real[:, None, :]
    if mask is not None:
        rows = gather_columns(mask, source, -2)
        gathered = gather_columns(rows, source, -1)[:, 0]
        allowed &= gathered.to(source.device) if gathered.dtype == torch.bool else (gathered == 0).to(source.device)
    elif key_mask is not None:
        allowed &= key_mask.gather(1, source)[:, None, :]
    allowed |= torch.diag_embed(~real)
    return _allowed_in_format(allowed[:, None], mask)


def _decode_mask(mask: Tensor | None, source: Tensor, real: Tensor, length: int, keys: int, queries: int) -> Tensor | None:
    """The mask of new tokens over a pruned layer's cache: the pruned prompt's slots (padding slots
    hidden), then every generated token as the model's own mask has it."""
    if mask is None and bool(real.all()):
        return None
    batch, device = source.shape[0], source.device
    generated = keys - source.shape[1]
    if mask is None:
        allowed = torch.ones(batch, 1, queries, keys, dtype=torch.bool, device=device)
    else:
        columns = torch.cat([source, torch.arange(length, length + generated, device=device).expand(batch, -1)], dim=1)
        allowed = gather_columns(mask, columns, -1)
        allowed = allowed.to(device) if allowed.dtype == torch.bool else (allowed == 0).to(device)
    pad = torch.cat([~real, torch.zeros(batch, generated, dtype=torch.bool, device=device)], dim=1)
    allowed = allowed & ~pad[:, None, None, :]
    return _allowed_in_format(allowed, mask)
