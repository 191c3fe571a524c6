"""SparseVLM against a plain-loop reference of its official rule (v1.5, Gumpest/SparseVLMs) written here:
raters, the raters' attention (by hand: q/k projections, rotary, causal softmax), kept tokens per
layer and recycled cluster tokens; its budget schedule by hand; batches against single prompts."""

import math
from contextlib import contextmanager

import pytest
import torch

import zoo_prune.tiny
from vlm_helpers import (  # noqa: F401  (one_thread is a fixture)
    alone, assert_batch_generates_like_each_prompt_alone, attention_implementations, logits, one_thread, prompts,
)
from zoo_prune import apply_pruning, available_methods, get_method
from zoo_prune.methods.sparsevlm import density_peak_merge

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the official rule, in plain loops ---------------------------------------------------------------
def reference_raters(visual, text):
    """Indices of the text tokens whose relevance (softmax over text of v . t, averaged over the visual
    tokens) is above its mean."""
    relevance = [0.0] * len(text)
    for v in visual:
        logits_ = [float(v @ t) for t in text]
        top = max(logits_)
        weights = [math.exp(x - top) for x in logits_]
        for j, w in enumerate(weights):
            relevance[j] += w / sum(weights) / len(visual)
    mean = sum(relevance) / len(relevance)
    return [j for j, r in enumerate(relevance) if r > mean]


def reference_clusters(x, c):
    """Density-peak kNN clustering (cluster_and_merge of v1.5; equal densities broken by index instead of
    its random noise), each cluster averaged; clusters in the order of their centres' scores."""
    m, d = x.shape
    dist = [[math.sqrt(sum((float(x[i, t]) - float(x[j, t])) ** 2 for t in range(d))) / math.sqrt(d) for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:c]) / c) for row in dist]
    largest = max(max(row) for row in dist)
    denser = [[density[j] > density[i] or (density[j] == density[i] and j < i) for j in range(m)] for i in range(m)]
    parent = [min([dist[i][j] for j in range(m) if denser[i][j]] or [largest]) for i in range(m)]
    centres = sorted(range(m), key=lambda i: -parent[i] * density[i])[:c]
    members = [[] for _ in range(c)]
    for j in range(m):
        if j in centres:
            members[centres.index(j)].append(j)
        else:
            members[min(range(c), key=lambda t: (dist[centres[t]][j], t))].append(j)
    return torch.stack([x[group].mean(dim=0) for group in members])


def rotate(x, positions, inv_freq):
    """Llama's rotary embedding of (n, head_dim) vectors at ``positions``, by hand."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    for i, p in enumerate(positions):
        for f in range(half):
            angle = p * float(inv_freq[f])
            a, b = x[i, f], x[i, f + half]
            out[i, f], out[i, f + half] = a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)
    return out


@torch.no_grad()
def reference_rater_scores(layer, normed, positions, raters, visual, inv_freq):
    """Per visual slot: the raters' causal softmax attention in ``layer`` averaged over heads and raters."""
    attention = layer.self_attn
    d = attention.head_dim
    weight_q, weight_k = attention.q_proj.weight.double(), attention.k_proj.weight.double()
    x = normed.double()
    heads, kv_heads = weight_q.shape[0] // d, weight_k.shape[0] // d
    scores = torch.zeros(len(visual), dtype=torch.float64)
    for h in range(heads):
        g = h // (heads // kv_heads)
        keys = rotate(x @ weight_k[g * d : (g + 1) * d].T, positions, inv_freq)
        for r in raters:
            query = rotate((x[r : r + 1] @ weight_q[h * d : (h + 1) * d].T), [positions[r]], inv_freq)[0]
            logits_ = [float(query @ keys[j]) / math.sqrt(d) for j in range(r + 1)]  # causal: keys up to the rater
            top = max(logits_)
            total = sum(math.exp(v - top) for v in logits_)
            for n, slot in enumerate(visual):
                scores[n] += math.exp(logits_[slot] - top) / total / heads / len(raters)
    return scores


@contextmanager
def record_layers(model):
    """The language model's input embeddings, and every decoder layer's input and output."""
    record = {"in": {}, "out": {}}
    lm = model.model.language_model

    def keep(key, index, value):  # the first call only (the prefill)
        (record[key] if index is not None else record).setdefault(index if index is not None else key, value)

    handles = [lm.register_forward_pre_hook(lambda m, a, kw: keep("embeds", None, kw["inputs_embeds"]), with_kwargs=True)]
    for i, layer in enumerate(lm.layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, kw, i=i: keep("in", i, a[0] if a else kw["hidden_states"]), with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, out, i=i: keep("out", i, out[0] if isinstance(out, tuple) else out)))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def deep_tiny(monkeypatch):
    """A tiny LLaVA whose language model has 5 layers (three distinct pruning layers fit)."""
    text_config = zoo_prune.tiny._text_config
    monkeypatch.setattr(zoo_prune.tiny, "_text_config", lambda tokenizer: {**text_config(tokenizer), "num_hidden_layers": 5})
    model, _, inputs = prompts("llava", ((40, 50),))
    return model, inputs


def test_sparsevlm_on_a_tiny_llava_follows_the_official_rule_layer_by_layer(deep_tiny):
    model, inputs = deep_tiny
    method = get_method("sparsevlm", layers=(0, 1, 3))
    keep = 8  # of 64: the 64-of-576 schedule scaled by 8/64 -> budgets 8, 4, 2
    assert method.schedule(64, keep, 5) == [(0, 8), (1, 4), (3, 2)]
    lm = model.model.language_model
    ids = inputs["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero()[:, 0].tolist()
    with apply_pruning(model, "sparsevlm", keep=keep, layers=(0, 1, 3)) as handle, record_layers(model) as seen:
        logits(model, inputs)
        kept_indices, tokens = handle.kept_indices[0].tolist(), handle.attachment.hooks.tokens_per_layer[0]
    # raters: the text after the image, by relevance to the visual input embeddings
    embeds = seen["embeds"][0]
    text = list(range(image[-1] + 1, len(ids)))
    raters = [text[j] for j in reference_raters(embeds[image].double(), embeds[text].double())]
    # the pruned sequence, slot by slot: its prompt column (positions) and, for visual tokens, the original index
    columns, origin = list(range(len(ids))), {c: n for n, c in enumerate(image)}
    visual = list(image)  # current slots of the visual tokens
    counts, columns_from = [len(image)], {}
    inv_freq = lm.rotary_emb.inv_freq
    for layer, budget in [(0, 8), (1, 4), (3, 2)]:
        hidden_in = seen["in"][layer][0]
        assert hidden_in.shape[0] == len(columns)
        normed = lm.layers[layer].input_layernorm(hidden_in)
        rater_slots = [columns.index(c) for c in raters]
        scores = reference_rater_scores(lm.layers[layer], normed, columns, rater_slots, visual, inv_freq)
        order = sorted(range(len(visual)), key=lambda n: -float(scores[n]))
        kept, pruned = sorted(order[:budget]), order[budget:]
        recycled = pruned[: int(len(pruned) * 0.3) + 1]
        out = seen["out"][layer][0]
        clusters = reference_clusters(out[[visual[n] for n in recycled]].double(), (int(len(pruned) * 0.3) + 1) // 10 + 1)
        start, end = visual[0], visual[-1] + 1
        expected = torch.cat([out[:start].double(), out[[visual[n] for n in kept]].double(), clusters, out[end:].double()])
        torch.testing.assert_close(seen["in"][layer + 1][0].double(), expected, rtol=1e-5, atol=1e-5)
        new_origin = [origin.get(visual[n]) for n in kept] + [None] * len(clusters)
        columns = columns[:start] + [columns[visual[n]] for n in kept] + [image[-1]] * len(clusters) + columns[end:]
        visual = list(range(start, start + len(kept) + len(clusters)))
        origin = {slot: o for slot, o in zip(visual, new_origin) if o is not None}
        counts.append(len(visual))
        columns_from[layer + 1] = columns
    assert kept_indices == sorted(origin.values())
    assert tokens == [64, 10, 5, 5, 3] == [counts[0], counts[1], counts[2], counts[2], counts[3]]
    assert tokens == method.visual_tokens(64, keep, 5)
    # every layer after the first pruning one ran causally over its pruned sequence, each token at its own position
    with torch.no_grad():
        for layer in range(1, 5):
            hidden = seen["in"][layer]
            positions = torch.tensor([columns_from[max(k for k in columns_from if k <= layer)]])
            reference = lm.layers[layer](hidden, attention_mask=None, position_ids=positions,
                                         position_embeddings=lm.rotary_emb(hidden, positions))
            torch.testing.assert_close(seen["out"][layer], reference, rtol=1e-5, atol=1e-5)


def test_density_peak_merge_matches_the_plain_loop_clustering():
    generator = torch.Generator().manual_seed(0)
    for m, c, d in [(17, 2, 8), (40, 5, 6), (9, 1, 4), (25, 3, 16)]:
        x = torch.randn(m, d, generator=generator) + 3 * torch.randint(0, 3, (m, 1), generator=generator)  # a few blobs
        torch.testing.assert_close(density_peak_merge(x, c).double(), reference_clusters(x.double(), c), rtol=1e-5, atol=1e-6)
    assert density_peak_merge(torch.randn(6, 4, dtype=torch.bfloat16), 2).dtype == torch.bfloat16


@pytest.mark.parametrize("keep, budgets, per_layer, average", [
    # the official per-layer budgets for 576 tokens; per layer, by hand: all 576 up to layer 2, then kept +
    # recycled (30% + 1 of the pruned, one cluster per ten + 1); the paper's average counts each layer's output
    (192, [300, 200, 110], [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16, 6145 / 32),
    (128, [303, 110, 36], [576] * 3 + [312] * 4 + [117] * 9 + [39] * 16, 4116 / 32),
    (64, [66, 30, 17], [576] * 3 + [82] * 4 + [32] * 9 + [18] * 16, 2074 / 32),
])
def test_budgets_are_the_official_ones_and_counts_follow_by_hand(keep, budgets, per_layer, average):
    method = get_method("sparsevlm")
    assert method.budgets(576, keep) == budgets
    assert method.schedule(576, keep, 32) == list(zip((2, 6, 15), budgets))
    assert method.visual_tokens(576, keep, 32) == per_layer
    assert sum(per_layer[1:] + per_layer[-1:]) / 32 == pytest.approx(average)
    assert abs(average - keep) < 1  # the paper's 192 / 128 / 64
    assert method.llm_tokens(576, keep, 40, 32) == [40 + n for n in per_layer]


def test_other_budgets_scale_the_nearest_schedule_and_layers_clip_to_a_shallow_model():
    method = get_method("sparsevlm")
    assert [method.budgets(144, k) for k in (48, 32, 16)] == [[75, 50, 28], [76, 28, 9], [17, 8, 4]]
    assert method.budgets(64, 64) == [64, 64, 64]  # keep = all: nothing pruned
    assert method.schedule(144, 48, 3) == [(1, 28)]  # 2, 6, 15 clipped to layer 1; one stage, the last budget
    assert method.schedule(144, 48, 8) == [(2, 75), (6, 28)]
    assert method.visual_tokens(144, 16, 3) == [144, 144, 4 + (int(140 * 0.3) + 1) // 10 + 1]
    assert get_method("sparsevlm", recycle=False).visual_tokens(144, 16, 3) == [144, 144, 4]
    with pytest.raises(ValueError, match="at least 2 layers"):
        method.schedule(144, 16, 1)
    with pytest.raises(ValueError, match="layers=\\(6, 2, 15\\)"):
        get_method("sparsevlm", layers=(6, 2, 15))
    assert "sparsevlm" in available_methods()


@pytest.mark.parametrize("family, keep, sizes", [
    ("llava", 16, ((40, 50), (36, 60))), ("llava_next", 40, ((40, 50), (70, 30))), ("qwen2_5_vl", 0.3, ((40, 50), (36, 60))),
])
def test_a_batch_generates_like_each_prompt_alone_under_sdpa(family, keep, sizes):
    model, _, inputs = prompts(family, sizes)
    assert attention_implementations(model) == ("sdpa", "sdpa")
    assert_batch_generates_like_each_prompt_alone(model, inputs, "sparsevlm", keep)


def test_per_layer_counts_are_the_methods_and_keep_all_is_the_unpruned_model():
    model, _, inputs = prompts("llava_next", ((40, 50), (70, 30)))
    method = get_method("sparsevlm")
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    with apply_pruning(model, "sparsevlm", keep=40) as handle:
        logits(model, inputs)
        budgets = [5 * 8, 3 * 8]  # 8 per patch, 5 and 3 patches
        assert handle.attachment.hooks.tokens_per_layer == [method.visual_tokens(n, k, 3) for n, k in zip(counts, budgets)]
        assert handle.attachment.hooks.average_tokens == [sum(t[1:] + t[-1:]) / 3 for t in handle.attachment.hooks.tokens_per_layer]
    model, _, inputs = prompts("llava")
    full = logits(model, inputs)
    with apply_pruning(model, "sparsevlm", keep=64) as handle:
        torch.testing.assert_close(logits(model, inputs), full)
        assert [k.tolist() for k in handle.kept_indices] == [list(range(64))] * 2


@pytest.mark.parametrize("method", ["sparsevlm", "fastv"])
def test_an_eager_model_prunes_as_the_sdpa_one(method):
    """The same batch (padded rows of different lengths) with the language model in eager attention
    (additive float masks) keeps the same tokens and gives the same outputs as under SDPA (bool masks)."""
    model, _, inputs = prompts("qwen2_5_vl", ((40, 50), (36, 60)))
    results = []
    for implementation in ("sdpa", "eager"):
        model.model.language_model.set_attn_implementation(implementation)
        with apply_pruning(model, method, keep=0.3) as handle:
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
            results.append(([k.tolist() for k in handle.kept_indices], out))
            assert model.model.language_model.config._attn_implementation == implementation
    (kept_sdpa, sdpa), (kept_eager, eager) = results
    assert kept_sdpa == kept_eager and torch.equal(sdpa.sequences, eager.sequences)
    for got, want in zip(eager.logits, sdpa.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
