"""VisionZip and FastV: hand-checkable cases and, inside the tiny models, eager attention as the reference."""

import copy
from contextlib import contextmanager

import pytest
import torch

from vlm_helpers import (  # noqa: F401  (one_thread is a fixture)
    alone, assert_batch_generates_like_each_prompt_alone, attention_implementations, llm_inputs, logits, one_thread, prompts, row, unpadded,
)
from zoo_prune import apply_pruning, get_method
from zoo_prune.tiny import build_tiny
from zoo_prune.methods.visionzip import visionzip_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


# -- VisionZip --------------------------------------------------------------------------------------
def test_visionzip_on_a_hand_checkable_case():
    hidden = torch.arange(14, dtype=torch.float32).view(1, 7, 2)  # CLS, then patches 0..5
    cls_attention = torch.tensor([[0.10, 0.50, 0.05, 0.30, 0.02, 0.03]])
    keys = torch.tensor([[[5.0, 5.0], [1, 0], [0, 0], [0.9, 0.1], [0, 0], [0, 1], [0.2, 1]]])  # CLS, patches 0..5
    tokens, patches = visionzip_tokens(hidden, cls_attention, keys, dominant=3, contextual=2)
    # dominant: CLS + patches 1 and 3; the rest (0, 2, 4, 5), step 2 -> targets 0 and 4;
    # patch 2's key is closest to patch 0's, patch 5's to patch 4's.
    h = hidden[0, 1:]
    expected = torch.stack([hidden[0, 0], h[1], h[3], h[0] + h[2], h[4] + h[5]])
    torch.testing.assert_close(tokens[0], expected)
    assert patches.tolist() == [[1, 3, 0, 4]]


def test_visionzip_contextual_token_is_target_plus_mean_of_its_merged_tokens():
    hidden = torch.randn(1, 6, 3)
    cls_attention = torch.tensor([[0.9, 0.1, 0.1, 0.1, 0.1]])
    keys = torch.tensor([[[0.0, 1], [0, 1], [1, 0], [1, 0.1], [1, 0.2], [1, -0.1]]])
    tokens, patches = visionzip_tokens(hidden, cls_attention, keys, dominant=2, contextual=1)
    h = hidden[0, 1:]  # dominant patch 0; rest 1..4, target 1, merged 2, 3, 4
    torch.testing.assert_close(tokens[0, 2], h[1] + (h[2] + h[3] + h[4]) / 3)
    assert patches.tolist() == [[0, 1]]


@pytest.mark.parametrize("keep, split", [(192, (162, 30)), (128, (108, 20)), (64, (54, 10)), (32, (27, 5))])
def test_visionzip_default_split_is_the_papers(keep, split):
    assert get_method("visionzip").split(keep) == split


def eager_vision_state(model, pixel_values, layer=-2):
    """Layer -2's output and its CLS attention summed over heads, from an eager copy of the tower."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    return out.hidden_states[layer], out.attentions[layer][:, :, 0, 1:].sum(dim=1)


def test_visionzip_in_llava_keeps_the_top_cls_attention_set_then_projects_the_merged_tokens():
    model, _, inputs = prompts("llava")
    keep = 16
    dominant, contextual = get_method("visionzip").split(keep)
    hidden, cls_attention = eager_vision_state(model, inputs["pixel_values"])
    with apply_pruning(model, "visionzip", keep=keep) as handle, llm_inputs(model) as calls:
        logits(model, inputs)
    received = unpadded(calls[0]["inputs_embeds"], calls[0]["attention_mask"])
    for i in range(2):
        top = cls_attention[i].topk(dominant - 1).indices.sort().values
        assert handle.kept_indices[i][: dominant - 1].tolist() == top.tolist()
        assert len(handle.kept_indices[i]) == dominant - 1 + contextual
        ids = inputs["input_ids"][i][inputs["attention_mask"][i].bool()]
        start = int((ids == model.config.image_token_id).nonzero()[0, 0])
        assert len(received[i]) == len(ids) - (64 - keep)  # k = D + C visual tokens reach the LLM
        with torch.no_grad():  # CLS then the dominant patches, through the projector, in original order
            dominant_tokens = model.model.multi_modal_projector(hidden[i][torch.cat([torch.tensor([0]), top + 1])])
        torch.testing.assert_close(received[i][start : start + dominant], dominant_tokens)


def test_visionzip_in_llava_next_works_per_patch():
    model, _, inputs = prompts("llava_next", ((40, 50), (70, 30)))
    with apply_pruning(model, "visionzip", keep=40) as handle:
        out = logits(model, inputs)
    assert [tuple(k.shape) for k in handle.kept_indices] == [(5, 7), (3, 7)]  # 8 per patch: CLS + 6 dominant + 1 contextual
    assert not torch.isnan(out).any()


# -- FastV ------------------------------------------------------------------------------------------
@contextmanager
def layer_inputs(model):
    """The hidden states entering every decoder layer, per call."""
    record = {}
    layers = model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: record.setdefault(i, []).append(a[0] if a else kw["hidden_states"]),
                                               with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def eager_last_token_attention(model, inputs, layer):
    """Attention of the last token in decoder layer ``layer``, averaged over heads, from an eager copy."""
    eager = copy.deepcopy(model)
    eager.model.language_model.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    return out.attentions[layer][:, :, -1].float().mean(dim=1)


@pytest.mark.parametrize("family, keep", [("llava", 10), ("qwen2_5_vl", 0.25), ("llava_next", 40)])
def test_fastv_layers_below_k_see_every_token_and_from_k_on_only_the_top_k(family, keep):
    model, _, inputs = prompts(family, ((40, 50), (40, 50)))
    K = 2
    inputs = {**row(inputs, 0), **{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}}
    inputs["pixel_values"] = inputs["pixel_values"][: len(inputs["pixel_values"]) // 2]  # the first image only
    for key in ("image_sizes", "image_grid_thw"):
        if key in inputs:
            inputs[key] = inputs[key][:1]
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    attention = eager_last_token_attention(model, inputs, K - 1)[0, image]
    with layer_inputs(model) as full:
        logits(model, inputs)
    with apply_pruning(model, "fastv", keep=keep) as handle, layer_inputs(model) as pruned:
        out = logits(model, inputs)
    k = len(handle.kept_indices[0])
    assert k == {"llava": 10, "qwen2_5_vl": round(0.25 * len(image)), "llava_next": 5 * 8}[family]
    assert handle.kept_indices[0].tolist() == attention.topk(k).indices.sort().values.tolist()
    length = inputs["input_ids"].shape[1]
    kept = torch.cat([torch.arange(image[0]), image[handle.kept_indices[0]], torch.arange(image[-1] + 1, length)])
    assert [pruned[i][0].shape[1] for i in range(3)] == [length, length, length - len(image) + k]
    for i in range(K):
        torch.testing.assert_close(pruned[i][0], full[i][0])  # below K: the whole prompt, unchanged
    torch.testing.assert_close(pruned[K][0], full[K][0][:, kept])  # from K on: only the kept tokens
    assert out.shape[1] == len(kept)


def test_fastv_generation_keeps_short_caches_from_layer_k_and_batches_like_single_prompts():
    model, _, inputs = prompts("llava", ((40, 50), (36, 60)))
    with apply_pruning(model, "fastv", keep=10) as handle:
        batched = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
        kept = [k.clone() for k in handle.kept_indices]
        cache = batched.past_key_values
        length = inputs["input_ids"].shape[1]
        assert [cache.layers[i].keys.shape[2] for i in range(3)] == [length + 2, length + 2, length - 54 + 2]
        for i in range(2):
            single = model.generate(**row(inputs, i), pixel_values=inputs["pixel_values"][i : i + 1], max_new_tokens=3,
                                    min_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
            assert torch.equal(handle.kept_indices[0], kept[i])
            assert torch.equal(single.sequences[0, -3:], batched.sequences[i, -3:])
            for got, want in zip(batched.logits, single.logits):
                torch.testing.assert_close(got[i], want[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family, keep, sizes", [("qwen2_5_vl", 0.2, ((40, 50), (36, 60))), ("llava_next", 40, ((40, 50), (70, 30)))])
def test_fastv_batches_images_of_different_sizes_like_each_alone_keeping_the_eager_top_k(family, keep, sizes):
    """Rows that keep different numbers of tokens are padded; each keeps what an eager computation
    of its last token's attention row (layer K - 1, the prompt alone) ranks top."""
    model, _, inputs = prompts(family, sizes)
    assert attention_implementations(model) == ("sdpa", "sdpa")
    eager = []
    for i in range(2):
        single = alone(inputs, i)
        image = (single["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
        eager.append(eager_last_token_attention(model, single, 1)[0, image])
    kept = assert_batch_generates_like_each_prompt_alone(model, inputs, "fastv", keep)
    assert len(kept[0]) != len(kept[1]) or family == "qwen2_5_vl"
    for attention, k in zip(eager, kept):
        assert k.tolist() == attention.topk(len(k)).indices.sort().values.tolist()


def test_fastv_rows_of_different_lengths_after_pruning_are_left_padded_with_unseen_slots():
    model, _, inputs = prompts("qwen2_5_vl", ((40, 50), (36, 60)))
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    with apply_pruning(model, "fastv", keep=0.2) as handle, layer_inputs(model) as seen:
        out = logits(model, inputs)
    kept = [len(k) for k in handle.kept_indices]
    lengths = [inputs["input_ids"].shape[1] - n + k for n, k in zip(counts, kept)]  # prompt padding stays
    assert kept == [round(0.2 * n) for n in counts] and lengths[0] != lengths[1]
    assert seen[2][0].shape[1] == max(lengths) == out.shape[1]  # the shorter row padded on the left
    assert not torch.isnan(out).any()


def test_visionzip_needs_a_cls_token_and_baselines_have_no_select():
    model, _, _ = prompts("llava")
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="'visionzip'.*LlavaForConditionalGeneration.*'full'"):
        apply_pruning(model, "visionzip", keep=16)
    assert "forward" not in vars(model)
    for name, kind in (("visionzip", "vision"), ("fastv", "llm"), ("sparsevlm", "llm")):  # they act inside the model: no select on tokens
        assert get_method(name).kind == kind and not hasattr(get_method(name), "select")


def test_decoder_pruning_pads_rows_when_the_model_passes_no_mask():
    """Rows of an unpadded batch (SDPA gets no mask) that keep different numbers of tokens: the hooks
    build the padded rows' masks themselves, in the prefill and every generated step."""
    from zoo_prune.methods.fastv import FastVHooks
    from zoo_prune.tiny import chat_prompt, tiny_image

    model, processor = build_tiny("llava")
    text = chat_prompt(processor, "what is in the image?")
    inputs = processor(images=[tiny_image(0), tiny_image(1)], text=[text, text], return_tensors="pt")
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    columns = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    lm = model.model.language_model
    hooks = FastVHooks(lm, lm.layers, 2)
    seen = []
    probe = lm.layers[2].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    try:
        hooks.arm([(0, columns, 10), (1, columns, 20)], ids.shape[1], None)
        batched = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
        assert [len(k) for k in hooks.kept_indices] == [10, 20] and all(m is not None and m.dtype == torch.bool for m in seen)
        for i, k in enumerate((10, 20)):
            hooks.arm([(0, columns, k)], ids.shape[1], None)
            single = model.generate(input_ids=ids[i : i + 1], pixel_values=pixels[i : i + 1], max_new_tokens=3,
                                    min_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
            assert torch.equal(single.sequences[0], batched.sequences[i])
            for got, want in zip(batched.logits, single.logits, strict=True):
                torch.testing.assert_close(got[i], want[0], rtol=1e-4, atol=1e-5)
    finally:
        probe.remove()
        hooks.remove()


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_llm_stage_beam_search_prunes_every_beam_as_its_prompt(method):
    model, _, inputs = prompts("llava", ((40, 50), (36, 60)))
    beams = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with apply_pruning(model, method, keep=10) as handle:
        batched = model.generate(**inputs, **beams)
        kept = [k.clone() for k in handle.kept_indices]
        assert len(kept) == 4 and torch.equal(kept[0], kept[1]) and torch.equal(kept[2], kept[3])
        for i in range(2):
            single = model.generate(**alone(inputs, i), **beams)
            assert torch.equal(handle.kept_indices[0], kept[2 * i])
            assert torch.equal(single[:, -3:], batched[2 * i : 2 * i + 2, -3:])
