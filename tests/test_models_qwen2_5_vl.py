"""apply_pruning on Qwen2_5_VLForConditionalGeneration: selection on the merger, gathered M-RoPE positions."""

import pytest
import torch
from scipy.stats import spearmanr

from vlm_helpers import (  # noqa: F401  (one_thread is a fixture)
    assert_generate_spliced, expected_sequence, greedy, greedy_scored, kept_in_float32_and_bf16, left_padded, llm_inputs, logits,
    one_thread, prompts, row, unpadded,
)
from zoo_prune import GroupedProjector, apply_pruning, select_tokens, zo_sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = ((40, 50), (36, 60))


def merger_io(model, inputs):
    """Per image: X (tokens, 4C), the merger's input regrouped per merged token, and Z, the merged
    tokens in the order the model scatters them. The tower runs in window order: the permutation is
    found here by matching the merger's own outputs to ``get_image_features``' ones."""
    record = {}
    hook = model.model.visual.merger.register_forward_hook(lambda m, a, out: record.update(x=a[0], z=out))
    with torch.no_grad():
        pooled = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    hook.remove()
    z = torch.cat(pooled)
    order = torch.cdist(z.float(), record["z"].float()).argmin(dim=1)
    assert order.unique().numel() == len(order)
    x = record["x"].reshape(len(order), -1)[order]
    counts = [len(p) for p in pooled]
    return list(zip(x.split(counts), pooled))


def library_selection(model, x, z, k, fusion, seed=0):
    sensitivity = None
    if fusion == "multiply":
        sensitivity = zo_sensitivity(GroupedProjector(model.model.visual.merger, 4), x, seed=seed, estimator="naive")
    return select_tokens(z, k, sensitivity=sensitivity, fusion=fusion).sort().values


def kept_columns(inputs, image_token_id, chosen):
    """Per row: the prompt columns that survive (text, padding excluded, and the kept image tokens)."""
    columns = []
    for ids, mask, picks in zip(inputs["input_ids"], inputs["attention_mask"], chosen):
        image = (ids == image_token_id).nonzero()[:, 0]
        keep = mask.bool() & (ids != image_token_id)
        keep[image[picks]] = True
        columns.append(keep.nonzero()[:, 0])
    return columns


def test_merger_regrouping_reproduces_the_merged_tokens():
    model, _, inputs = prompts("qwen2_5_vl", SIZES)
    grouped = GroupedProjector(model.model.visual.merger, 4)
    for x, z in merger_io(model, inputs):
        torch.testing.assert_close(grouped(x), z)


@pytest.mark.parametrize("method", ["zoo", "divprune"])
def test_keep_all_tokens_gives_the_unpruned_logits_and_generation(method):
    model, _, inputs = prompts("qwen2_5_vl", SIZES)
    expected, expected_tokens = logits(model, inputs), greedy(model, inputs)
    with apply_pruning(model, method, keep=1.0):
        torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(greedy(model, inputs), expected_tokens)


@pytest.mark.parametrize("method, fusion", [("zoo", "multiply"), ("divprune", "diversity")])
def test_language_model_receives_merged_tokens_at_the_selected_indices_with_their_own_positions(method, fusion):
    model, _, inputs = prompts("qwen2_5_vl", SIZES)
    ratio = 0.2
    io = merger_io(model, inputs)
    chosen = [library_selection(model, x, z, max(1, round(ratio * len(z))), fusion) for x, z in io]
    full_positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"]
    )
    with apply_pruning(model, method, keep=ratio) as handle, llm_inputs(model) as calls:
        logits(model, inputs)
    assert [c.tolist() for c in handle.kept_indices] == [c.tolist() for c in chosen]
    received, positions, mask = calls[0]["inputs_embeds"], calls[0]["position_ids"], calls[0]["attention_mask"]
    expected = expected_sequence(model, inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id,
                                 [z[c] for (_, z), c in zip(io, chosen)])
    for i, (got, want) in enumerate(zip(unpadded(received, mask), expected)):
        torch.testing.assert_close(got, want)  # exactly k merged tokens per image, text unchanged
    columns = kept_columns(inputs, model.config.image_token_id, chosen)
    for i in range(2):
        assert torch.equal(positions[:, i, mask[i].bool()], full_positions[:, i, columns[i]])  # gathered, never renumbered


def test_generate_continues_from_the_gathered_positions():
    model, _, inputs = prompts("qwen2_5_vl", SIZES)
    io = merger_io(model, inputs)
    chosen = [library_selection(model, x, z, max(1, round(0.25 * len(z))), "multiply") for x, z in io]
    full_positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"]
    )
    rows = expected_sequence(model, inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id,
                             [z[c] for (_, z), c in zip(io, chosen)])
    embeds, mask = left_padded(rows)
    positions = torch.zeros(3, 2, embeds.shape[1], dtype=torch.long)
    for i, columns in enumerate(kept_columns(inputs, model.config.image_token_id, chosen)):
        positions[:, i, mask[i].bool()] = full_positions[:, i, columns]
    with apply_pruning(model, "zoo", keep=0.25):
        output = greedy_scored(model, inputs)
    assert_generate_spliced(model, inputs, output, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)


def test_a_batch_of_two_images_of_different_sizes_selects_as_each_image_alone():
    model, _, inputs = prompts("qwen2_5_vl", SIZES)
    grids = inputs["image_grid_thw"]
    assert not torch.equal(grids[0], grids[1])
    with apply_pruning(model, "zoo", keep=0.3) as handle:
        logits(model, inputs)
        together = [k.clone() for k in handle.kept_indices]
        patches = grids.prod(dim=-1).tolist()
        pixels = inputs["pixel_values"].split(patches)
        for i in range(2):
            logits(model, {**row(inputs, i), "pixel_values": pixels[i], "image_grid_thw": grids[i : i + 1]})
            assert torch.equal(handle.kept_indices[0], together[i])


def test_bf16_model_keeps_the_float32_set():
    model, half, inputs, half_inputs, kept32, kept16 = kept_in_float32_and_bf16("qwen2_5_vl", keep=0.25, sizes=SIZES)
    io32, io16 = merger_io(model, inputs), merger_io(half, half_inputs)
    for i in range(2):
        if not torch.equal(kept32[i], kept16[i]):  # a different set only through near-ties
            s32 = zo_sensitivity(GroupedProjector(model.model.visual.merger, 4), io32[i][0], seed=0)
            s16 = zo_sensitivity(GroupedProjector(half.model.visual.merger, 4), io16[i][0], seed=0)
            assert s16.dtype == torch.float32
            assert spearmanr(s32, s16).statistic >= 0.99


def test_visionzip_is_refused_naming_model_and_method():
    model, _, _ = prompts("qwen2_5_vl", SIZES)
    with pytest.raises(ValueError, match="'visionzip'.*Qwen2_5_VLForConditionalGeneration"):
        apply_pruning(model, "visionzip", keep=0.2)
    assert "forward" not in vars(model)


def test_keep_above_an_images_tokens_fails_at_the_call_naming_the_value():
    model, _, inputs = prompts("qwen2_5_vl", SIZES)
    n_tokens = min(inputs["image_grid_thw"].prod(dim=-1).tolist()) // 4
    with apply_pruning(model, "zoo", keep=n_tokens + 1):
        with pytest.raises(ValueError, match=f"keep={n_tokens + 1}"):
            logits(model, inputs)
    torch.testing.assert_close(logits(model, inputs).shape, inputs["input_ids"].shape + (model.config.text_config.vocab_size,))
