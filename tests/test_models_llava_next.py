"""apply_pruning on LlavaNextForConditionalGeneration: per-patch budgets and the documented order."""

import pytest
import torch

from vlm_helpers import (  # noqa: F401  (one_thread is a fixture)
    assert_generate_spliced, expected_sequence, greedy_scored, left_padded, llm_inputs, logits, one_thread, prompts, row, unpadded,
)
from zoo_prune import apply_pruning, select_tokens, zo_sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")
N = 64  # tokens per patch of the tiny model
SIZES = ((40, 50), (70, 30))  # a 2 x 2 grid (5 patches) and a 2 x 1 grid (3 patches)


def patch_io(model, inputs):
    """Per image: X and Z (patches, N, d) of its real patches (the processor pads with zero patches)."""
    out = []
    with torch.no_grad():
        for pixels in inputs["pixel_values"]:
            pixels = pixels[pixels.flatten(1).abs().sum(1) > 0]
            x = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            out.append((x, model.model.multi_modal_projector(x)))
    return out


def test_tiny_images_have_five_and_three_patches():
    model, _, inputs = prompts("llava_next", SIZES)
    assert [x.shape[0] for x, _ in patch_io(model, inputs)] == [5, 3]


@pytest.mark.parametrize("method", ["zoo", "divprune"])
def test_keep_all_sends_base_then_crops_in_raster_order(method):
    model, _, inputs = prompts("llava_next", SIZES)
    io = patch_io(model, inputs)
    with apply_pruning(model, method, keep=5 * N) as handle, llm_inputs(model) as calls:
        output = greedy_scored(model, inputs)
    expected = expected_sequence(model, inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id,
                                 [z.reshape(-1, z.shape[-1]) for _, z in io])
    for got, want in zip(unpadded(calls[0]["inputs_embeds"], calls[0]["attention_mask"]), expected):
        torch.testing.assert_close(got, want)  # no unpadding, no newline tokens, patch after patch
    assert [k.tolist() for k in handle.kept_indices] == [[list(range(N))] * 5, [list(range(N))] * 3]
    assert_generate_spliced(model, inputs, output, **dict(zip(("inputs_embeds", "attention_mask"), left_padded(expected))))


@pytest.mark.parametrize("method, fusion", [("zoo", "multiply"), ("divprune", "diversity")])
def test_each_patch_keeps_its_share_selected_within_the_patch(method, fusion):
    model, _, inputs = prompts("llava_next", SIZES)
    keep, per_patch = 40, 8  # the 5-patch budget, and its share per patch
    kept_features, kept = [], []
    for x, z in patch_io(model, inputs):
        sensitivity = zo_sensitivity(model.model.multi_modal_projector, x, seed=0, estimator="lowrank", rank=128)
        picks = torch.stack([select_tokens(z[p], per_patch, sensitivity=sensitivity[p], fusion=fusion).sort().values
                             for p in range(x.shape[0])])
        kept.append(picks)
        kept_features.append(torch.cat([z[p][picks[p]] for p in range(x.shape[0])]))
    options = {"estimator": "lowrank"} if method == "zoo" else {}  # the paper's LLaVA-NeXT setting (params.yaml)
    with apply_pruning(model, method, keep=keep, **options) as handle, llm_inputs(model) as calls:
        logits(model, inputs)
    assert [k.tolist() for k in handle.kept_indices] == [k.tolist() for k in kept]
    assert [len(f) for f in kept_features] == [5 * per_patch, 3 * per_patch]  # fewer patches, proportionally fewer
    expected = expected_sequence(model, inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id, kept_features)
    for got, want in zip(unpadded(calls[0]["inputs_embeds"], calls[0]["attention_mask"]), expected):
        torch.testing.assert_close(got, want)


def test_a_batch_of_two_images_selects_as_each_image_alone():
    model, _, inputs = prompts("llava_next", SIZES)
    with apply_pruning(model, "zoo", keep=80) as handle:
        logits(model, inputs)
        together = [k.clone() for k in handle.kept_indices]
        for i in range(2):
            alone = {**row(inputs, i), "pixel_values": inputs["pixel_values"][i : i + 1], "image_sizes": inputs["image_sizes"][i : i + 1]}
            logits(model, alone)
            assert torch.equal(handle.kept_indices[0], together[i])


def test_a_ratio_keeps_that_share_of_every_patch_and_a_budget_above_five_patches_fails():
    model, _, inputs = prompts("llava_next", SIZES)
    with apply_pruning(model, "divprune", keep=0.25) as handle:
        logits(model, inputs)
    assert [tuple(k.shape) for k in handle.kept_indices] == [(5, 16), (3, 16)]
    with pytest.raises(ValueError, match="keep=321.*320"):
        apply_pruning(model, "zoo", keep=5 * N + 1)
    assert "forward" not in vars(model)
