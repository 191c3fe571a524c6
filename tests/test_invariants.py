"""The invariants every pruning path keeps, for every registered method on every model family:

* keep = every token gives the unpruned model's outputs (methods that can keep every token);
* a batch gives each prompt's batch-of-1 result;
* the model's attention implementation is never switched, before, during or after pruning;
* removing pruning restores the model exactly (outputs of a never-patched copy);
* a method registered in user code runs through ``apply_pruning``.

The methods come from the registry, so a newly registered one is checked without editing this file.
"""

import copy
from dataclasses import dataclass

import pytest
import torch

from vlm_helpers import greedy, logits, one_thread, prompts, row  # noqa: F401  (one_thread is a fixture)
from zoo_prune import adapter_for, apply_pruning, available_methods, get_method, method_class, register_method
from zoo_prune.methods import ProjectorMethod

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
ALL = {"llava": 64, "llava_next": 5 * 64, "qwen2_5_vl": 1.0}  # keep = every token (tiny models: 64 per patch)
SOME = {"llava": 16, "llava_next": 80, "qwen2_5_vl": 0.5}
# Methods whose mechanics change the tokens even at keep = all: VisionZip merges contextual tokens
# into targets and always keeps the CLS token.
CANNOT_KEEP_ALL = {"visionzip"}


def small_options(name: str) -> dict:
    options = method_class(name).options()
    return {k: v for k, v in {"m": 4, "layer": 1}.items() if k in options}


def cases(select=lambda family, name: True):
    for family in FAMILIES:
        model, _, _ = prompts(family, sizes=((32, 32),))
        for name in available_methods():
            if method_class(name).kind in adapter_for(model).supports and select(family, name):
                yield pytest.param(family, name, id=f"{family}-{name}")


def attention_implementations(model) -> set:
    return {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}


@pytest.mark.parametrize("family, name", list(cases(lambda family, name: name not in CANNOT_KEEP_ALL)))
def test_keep_all_equals_the_unpruned_model(family, name):
    model, _, inputs = prompts(family)
    expected, expected_tokens = logits(model, inputs), greedy(model, inputs)
    with apply_pruning(model, name, keep=ALL[family], **small_options(name)):
        got = logits(model, inputs)
        tokens = greedy(model, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("family, name", list(cases()))
def test_a_batch_gives_each_prompts_batch_of_one_result(family, name):
    model, _, inputs = prompts(family)
    with apply_pruning(model, name, keep=SOME[family], **small_options(name)):
        batched = logits(model, inputs)[:, -1]
        for i in range(2):
            single = {**row(inputs, i)}
            image_rows = slice(i, i + 1)
            for key in ("pixel_values", "image_sizes", "image_grid_thw"):
                if key in inputs:
                    single[key] = _image_part(inputs, key, i)
            torch.testing.assert_close(logits(model, single)[:, -1], batched[image_rows], rtol=1e-4, atol=1e-4)


def _image_part(inputs, key, i):
    """The images of prompt i (one image per prompt here); Qwen2.5-VL packs patches of all images."""
    if key == "pixel_values" and "image_grid_thw" in inputs:
        sizes = inputs["image_grid_thw"].prod(dim=-1).tolist()
        return inputs["pixel_values"].split(sizes)[i]
    return inputs[key][i : i + 1]


@pytest.mark.parametrize("family, name", list(cases()))
def test_attention_implementation_is_never_switched_and_removal_restores_the_model(family, name):
    model, _, inputs = prompts(family)
    never_patched = copy.deepcopy(model)
    before = attention_implementations(model)
    expected = logits(model, inputs)  # transformers installs hooks of its own on a first call
    hooks = hook_ids(model)
    handle = apply_pruning(model, name, keep=SOME[family], **small_options(name))
    logits(model, inputs)
    assert attention_implementations(model) == before
    handle.remove()
    assert attention_implementations(model) == before
    assert hook_ids(model) == hooks
    assert not {"forward", "generate", "_zoo_prune_dispatch"} & set(vars(model))
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, inputs), logits(never_patched, inputs), rtol=0, atol=0)


def hook_ids(model) -> set:
    return {(name, kind, key) for name, m in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks") for key in getattr(m, kind)}


@register_method("every_other_test")
@dataclass
class EveryOther(ProjectorMethod):
    """A method defined outside zoo_prune: every other token (then the first ones), k of them."""

    offset: int = 0

    def select(self, features, projected, k, *, projector):
        n = projected.shape[-2]
        order = torch.cat([torch.arange(self.offset % 2, n, 2), torch.arange(1 - self.offset % 2, n, 2)])[:k]
        return order.expand(*projected.shape[:-2], k)


def test_a_method_registered_in_user_code_runs_through_apply_pruning():
    model, _, inputs = prompts("llava")
    with apply_pruning(model, "every_other_test", keep=8, offset=1) as handle:
        logits(model, inputs)
    assert handle.kept_indices[0].tolist() == list(range(1, 16, 2))
    assert get_method("every_other_test").kind == "projector"
