"""apply_pruning on LlavaNextForConditionalGeneration: selection within the model's own packed layout."""

import pytest
import torch

from vlm_helpers import (  # noqa: F401  (one_thread is a fixture)
    assert_generate_spliced, expected_sequence, greedy_scored, left_padded, llm_inputs, logits, one_thread, prompts, row, unpadded,
)
from zoo_prune import apply_pruning, keep_count, select_tokens, zo_sensitivity

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


def packed(model, inputs):
    """Per image, the model's own packed layout of X and Z (base patch, then the unpadded crop grid row
    by row with a newline after each row): (X rows, Z rows, is_newline). X's newline is NaN, which
    marks the newline positions independently of the values."""
    io = patch_io(model, inputs)
    width = io[0][0].shape[-1]
    strategy = model.config.vision_feature_select_strategy
    xs, _ = model.model.pack_image_features([x for x, _ in io], inputs["image_sizes"], strategy,
                                            torch.full((width,), float("nan")))
    zs, _ = model.model.pack_image_features([z for _, z in io], inputs["image_sizes"], strategy, model.model.image_newline)
    return [(x, z, x.isnan().all(dim=1)) for x, z in zip(xs, zs)]


def test_keep_all_sends_exactly_the_unpruned_layout():
    """keep = every token: unpadding and newlines as the unpruned model has them (method.md section 3)."""
    model, _, inputs = prompts("llava_next", SIZES)
    with llm_inputs(model) as unpruned_calls:
        expected = greedy_scored(model, inputs)
    for method in ("zoo", "divprune", "pooling"):
        with apply_pruning(model, method, keep=5 * N) as handle, llm_inputs(model) as calls:
            output = greedy_scored(model, inputs)
        torch.testing.assert_close(calls[0]["inputs_embeds"], unpruned_calls[0]["inputs_embeds"])
        assert torch.equal(output.sequences, expected.sequences)
        layout = packed(model, inputs)
        assert [k.tolist() for k in handle.kept_indices] == [(~nl).nonzero()[:, 0].tolist() for _, _, nl in layout]


@pytest.mark.parametrize("method, fusion", [("zoo", "multiply"), ("divprune", "diversity")])
def test_base_patch_and_crop_grid_keep_their_shares_selected_within_each(method, fusion):
    model, _, inputs = prompts("llava_next", SIZES)
    keep, per_patch = 40, 8  # the 5-patch budget, and its share per patch
    expected, positions = [], []
    for x, z, newline in packed(model, inputs):
        picked = torch.zeros(len(x), dtype=torch.bool)
        for area in (torch.arange(len(x)) < N, (torch.arange(len(x)) >= N) & ~newline):
            where = area.nonzero()[:, 0]
            k = max(1, round(per_patch * len(where) / N))  # the crop grid: its share of a patch's budget
            s = zo_sensitivity(model.model.multi_modal_projector, x[where], seed=0, estimator="lowrank", rank=128)
            picked[where[select_tokens(z[where], k, sensitivity=s, fusion=fusion)]] = True
        take, row_start = picked.clone(), N
        for q in newline.nonzero()[:, 0].tolist():  # a newline stays when its row keeps a token
            take[q] = bool(picked[row_start:q].any())
            row_start = q + 1
        expected.append(z[take])
        positions.append(picked.nonzero()[:, 0].tolist())
    options = {"estimator": "lowrank"} if method == "zoo" else {}  # the paper's LLaVA-NeXT setting (params.yaml)
    with apply_pruning(model, method, keep=keep, **options) as handle, llm_inputs(model) as calls:
        logits(model, inputs)
    assert [k.tolist() for k in handle.kept_indices] == positions
    want = expected_sequence(model, inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id, expected)
    for got, w in zip(unpadded(calls[0]["inputs_embeds"], calls[0]["attention_mask"]), want):
        torch.testing.assert_close(got, w)


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
    areas = [(N, int((~nl).sum()) - N) for _, _, nl in packed(model, inputs)]  # base patch, unpadded crop grid
    assert [len(k) for k in handle.kept_indices] == [keep_count(0.25, b) + keep_count(0.25, c) for b, c in areas]
    with pytest.raises(ValueError, match="keep=321.*320"):
        apply_pruning(model, "zoo", keep=5 * N + 1)
    assert "forward" not in vars(model)
