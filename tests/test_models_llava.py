"""apply_pruning on LlavaForConditionalGeneration (tiny local model), against independent computations."""

import copy

import pytest
import torch
from scipy.stats import spearmanr

from vlm_helpers import (  # noqa: F401  (one_thread is a fixture)
    assert_generate_spliced, expected_sequence, greedy, greedy_scored, kept_in_float32_and_bf16, left_padded, llm_inputs, logits,
    one_thread, prompts, row, unpadded,
)
from zoo_prune import apply_pruning, select_tokens, zo_sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")
N = 64  # visual tokens per image of the tiny model (32 px, patch 4)
FUSION = {"zoo": "multiply", "sum_fusion": "sum", "sensitivity_only": "sensitivity", "divprune": "diversity", "random": "random"}


def projector_io(model, pixel_values):
    """X and Z computed here from the vision tower's layer -2 (CLS dropped) and the projector."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        return hidden, model.model.multi_modal_projector(hidden)


def library_selection(projector, x, z, k, method, seed=0):
    """The selection reproduced with the library functions alone (sorted)."""
    fusion = FUSION[method]
    sensitivity = None
    if fusion in ("multiply", "sum", "sensitivity"):
        sensitivity = zo_sensitivity(projector, x, seed=seed, estimator="fused")
    return select_tokens(z, k, sensitivity=sensitivity, fusion=fusion, seed=seed).sort().values


@pytest.mark.parametrize("method", ["zoo", "divprune"])
def test_keep_all_tokens_gives_the_unpruned_logits_and_generation(method):
    model, _, inputs = prompts("llava")
    expected, expected_tokens = logits(model, inputs), greedy(model, inputs)
    with apply_pruning(model, method, keep=N):
        torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(greedy(model, inputs), expected_tokens)


@pytest.mark.parametrize("method", list(FUSION))
def test_language_model_receives_projector_outputs_at_the_selected_indices(method):
    model, _, inputs = prompts("llava")
    k = 12
    x, z = projector_io(model, inputs["pixel_values"])
    chosen = [library_selection(model.model.multi_modal_projector, x[i], z[i], k, method) for i in range(2)]
    with apply_pruning(model, method, keep=k) as handle, llm_inputs(model) as calls:
        logits(model, inputs)
    assert [c.tolist() for c in handle.kept_indices] == [c.tolist() for c in chosen]
    received, mask = calls[0]["inputs_embeds"], calls[0]["attention_mask"]
    assert received.shape[1] == inputs["input_ids"].shape[1] - (N - k)  # each prompt is N - k tokens shorter
    expected = expected_sequence(model, inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id,
                                 [z[i][chosen[i]] for i in range(2)])
    for got, want in zip(unpadded(received, mask), expected):
        torch.testing.assert_close(got, want)  # exactly k visual embeddings per image, text unchanged


def test_generate_returns_the_prompt_then_the_tokens_of_the_pruned_prompt():
    model, _, inputs = prompts("llava")
    k = 10
    x, z = projector_io(model, inputs["pixel_values"])
    chosen = [library_selection(model.model.multi_modal_projector, x[i], z[i], k, "zoo") for i in range(2)]
    rows = expected_sequence(model, inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id,
                             [z[i][chosen[i]] for i in range(2)])
    embeds, mask = left_padded(rows)
    with apply_pruning(model, "zoo", keep=k):
        output = greedy_scored(model, inputs)
    assert_generate_spliced(model, inputs, output, inputs_embeds=embeds, attention_mask=mask)


def test_a_batch_of_two_images_selects_as_each_image_alone():
    model, _, inputs = prompts("llava")
    with apply_pruning(model, "zoo", keep=16) as handle:
        logits(model, inputs)
        together = [k.clone() for k in handle.kept_indices]
        alone = []
        for i in range(2):
            logits(model, {**row(inputs, i), "pixel_values": inputs["pixel_values"][i : i + 1]})
            alone.append(handle.kept_indices[0])
    assert not torch.equal(together[0], together[1])  # different images, different selections
    assert all(torch.equal(a, b) for a, b in zip(together, alone))


def test_bf16_model_keeps_the_float32_set_and_computes_sensitivity_in_float32():
    model, half, inputs, half_inputs, kept32, kept16 = kept_in_float32_and_bf16("llava", keep=16)
    for i in range(2):
        if not torch.equal(kept32[i], kept16[i]):  # a different set only through near-ties
            s32 = zo_sensitivity(model.model.multi_modal_projector, projector_io(model, inputs["pixel_values"])[0][i], seed=0)
            s16 = zo_sensitivity(half.model.multi_modal_projector, projector_io(half, half_inputs["pixel_values"])[0][i], seed=0)
            assert s16.dtype == torch.float32
            assert spearmanr(s32, s16).statistic >= 0.99


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(method="zoo", keep=N + 1), ValueError, ["keep=65", "64"]),
        (dict(method="zoo", keep=0), ValueError, ["keep", "0"]),
        (dict(method="zoo", keep=-3), ValueError, ["keep", "-3"]),
        (dict(method="zoo", keep=1.5), ValueError, ["keep=1.5"]),
        (dict(method="zoo", keep="64"), TypeError, ["'64'"]),
        (dict(method="magic", keep=8), ValueError, ["'magic'"]),
        (dict(method="zoo", keep=8, m=0), ValueError, ["m=0"]),
        (dict(method="fastv", keep=8, layer=3), ValueError, ["layer=3"]),
        (dict(method="divprune", keep=8, seed=1), TypeError, ["'seed'", "divprune"]),
    ],
)
def test_bad_arguments_raise_naming_the_value_and_leave_the_model_untouched(kwargs, error, words):
    model, _, inputs = prompts("llava")
    expected = logits(model, inputs)
    with pytest.raises(error) as raised:
        apply_pruning(model, **kwargs)
    assert all(word in str(raised.value) for word in words), str(raised.value)
    assert not {"forward", "generate", "_zoo_prune_dispatch"} & set(vars(model))
    assert not any(module._forward_pre_hooks for module in model.modules())
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)


def test_unsupported_model_raises_naming_its_class():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        apply_pruning(text_only, "zoo", keep=4)


@pytest.mark.parametrize("method", ["zoo", "visionzip", "fastv"])
def test_remove_restores_the_outputs_of_a_never_patched_copy(method):
    model, _, inputs = prompts("llava")
    never_patched = copy.deepcopy(model)
    handle = apply_pruning(model, method, keep=8)
    pruned = logits(model, inputs)
    greedy(model, inputs)
    handle.remove()
    handle.remove()  # harmless twice
    assert pruned.shape[1] < inputs["input_ids"].shape[1]
    assert not {"forward", "generate", "_zoo_prune_dispatch"} & set(vars(model))
    torch.testing.assert_close(logits(model, inputs), logits(never_patched, inputs), rtol=0, atol=0)
    assert torch.equal(greedy(model, inputs), greedy(never_patched, inputs))
    with apply_pruning(model, method, keep=8):  # and a context manager does the same
        assert logits(model, inputs).shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits(model, inputs), logits(never_patched, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("order", ["inner first", "outer first"])
def test_nested_handles_newest_in_effect_and_removed_in_either_order_restore_the_model(order):
    """A user's handle on a model that already has one (the lmms-eval model's): the newer is in
    effect; removing both, in either order, restores a never-patched copy's outputs exactly."""
    model, _, inputs = prompts("llava")
    never_patched = copy.deepcopy(model)
    outer = apply_pruning(model, "zoo", keep=8, m=4)
    with apply_pruning(copy.deepcopy(never_patched), "divprune", keep=4) as reference_handle:
        pass
    inner = apply_pruning(model, "divprune", keep=4)
    assert logits(model, inputs).shape[1] == inputs["input_ids"].shape[1] - N + 4  # the newer one (4 tokens)
    assert inner.active and not outer.active
    first, second = (inner, outer) if order == "inner first" else (outer, inner)
    first.remove()
    assert second.active
    kept = 8 if second is outer else 4
    assert logits(model, inputs).shape[1] == inputs["input_ids"].shape[1] - N + kept
    second.remove()
    assert not {"forward", "generate", "_zoo_prune_dispatch"} & set(vars(model))
    torch.testing.assert_close(logits(model, inputs), logits(never_patched, inputs), rtol=0, atol=0)
    assert torch.equal(greedy(model, inputs), greedy(never_patched, inputs))


def test_a_wrapper_installed_over_pruning_survives_its_removal():
    """Someone wraps ``generate`` after pruning (as an evaluation harness may): removing the pruning
    keeps their wrapper, and the model computes the unpruned outputs through it."""
    model, _, inputs = prompts("llava")
    never_patched = copy.deepcopy(model)
    handle = apply_pruning(model, "divprune", keep=4)
    calls = []
    pruned_generate = model.generate

    def counted(*args, **kwargs):
        calls.append(1)
        return pruned_generate(*args, **kwargs)

    model.generate = counted
    handle.remove()
    assert model.generate is counted
    assert torch.equal(greedy(model, inputs), greedy(never_patched, inputs)) and calls
    torch.testing.assert_close(logits(model, inputs), logits(never_patched, inputs), rtol=0, atol=0)
    with apply_pruning(model, "divprune", keep=4):  # no second pair of wrappers: the dispatcher is reused
        assert logits(model, inputs).shape[1] == inputs["input_ids"].shape[1] - N + 4


def test_positional_input_ids_and_labels_are_pruned_consistently():
    model, _, inputs = prompts("llava")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    with apply_pruning(model, "divprune", keep=N):
        full = model(inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"], labels=labels)
    reference = model(**inputs, labels=labels)
    torch.testing.assert_close(full.loss, reference.loss)
    with apply_pruning(model, "divprune", keep=8):
        pruned = model(inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"], labels=labels)
    assert torch.isfinite(pruned.loss)
