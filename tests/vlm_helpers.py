"""Shared by the model tests: tiny models' inputs and hooks that record what the language model receives."""

import copy
from contextlib import contextmanager

import pytest
import torch

from zoo_prune import apply_pruning
from zoo_prune.tiny import build_tiny, chat_prompt, tiny_image

QUESTIONS = ["what is in the image?", "how many cats are there on the left?"]


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread, and do not fight a benchmark for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompts(family, sizes=((40, 50), (36, 60)), seed=0, dtype=torch.float32):
    """(model, processor, inputs): a batch of different images and questions, left padded."""
    model, processor = build_tiny(family, dtype=dtype)
    images = [tiny_image(seed + i, size) for i, size in enumerate(sizes)]
    text = [chat_prompt(processor, QUESTIONS[i % 2]) for i in range(len(sizes))]
    inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
    if dtype != torch.float32:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model, processor, inputs


def kept_in_float32_and_bf16(family, keep, sizes=((40, 50), (36, 60))):
    """The same prompts through a float32 model and its bf16 copy under zoo pruning:
    (model, half, inputs, half_inputs, kept32, kept16); the bf16 logits must hold no NaN."""
    model, _, inputs = prompts(family, sizes)
    half = copy.deepcopy(model).to(torch.bfloat16)
    half_inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
    kept = []
    for m, i in ((model, inputs), (half, half_inputs)):
        with apply_pruning(m, "zoo", keep=keep) as handle:
            assert not torch.isnan(logits(m, i)).any()
            kept.append(handle.kept_indices)
    return model, half, inputs, half_inputs, *kept


def row(inputs, i):
    """Prompt i of a batch alone, padding removed."""
    keep = inputs["attention_mask"][i].bool()
    single = {key: value[i : i + 1, keep] for key, value in inputs.items() if key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return single


@contextmanager
def llm_inputs(model):
    """Record every call of the language model: its inputs_embeds, position_ids and attention_mask."""
    calls = []

    def hook(module, args, kwargs):
        calls.append({key: kwargs.get(key) for key in ("inputs_embeds", "position_ids", "attention_mask")})

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, n=4):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)


def expected_sequence(model, input_ids, mask, image_token_id, kept_features):
    """What the language model must receive: each row's text embeddings with the image placeholders
    replaced by that row's kept features (list per image, row-major), pruned placeholders removed,
    as (embeddings per row without padding)."""
    embed = model.get_input_embeddings()
    rows, images = [], iter(kept_features)
    for ids, m in zip(input_ids, mask):
        ids = ids[m.bool()]
        pieces, i = [], 0
        while i < len(ids):
            if ids[i] == image_token_id:
                j = i
                while j < len(ids) and ids[j] == image_token_id:
                    j += 1
                pieces.append(next(images))
                i = j
            else:
                pieces.append(embed(ids[i : i + 1]))
                i += 1
        rows.append(torch.cat(pieces))
    return rows


def unpadded(embeds, mask):
    """Rows of the language model's input without their padding."""
    return [e[m.bool()] for e, m in zip(embeds, mask)]


def left_padded(rows):
    """(inputs_embeds, attention_mask) of rows of embeddings, left padded."""
    length = max(len(r) for r in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[1], dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        embeds[i, length - len(r) :], mask[i, length - len(r) :] = r, 1
    return embeds, mask


def greedy_scored(model, inputs, n=4):
    """Greedy generation that also returns the logits of every step."""
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)


def assert_generate_spliced(model, inputs, output, **manual):
    """``output`` (``greedy_scored``) of a pruned generate = the caller's prompt, then the tokens and
    step logits that the unpatched model generates from the hand-built pruned prompt (``manual``:
    inputs_embeds, attention_mask, ...)."""
    n = output.sequences.shape[1] - inputs["input_ids"].shape[1]
    reference = greedy_scored(model, manual, n)
    assert torch.equal(output.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(output.sequences[:, inputs["input_ids"].shape[1] :], reference.sequences)
    for got, want in zip(output.logits, reference.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def alone(inputs, i):
    """Prompt i of a batch (one image per prompt) with its own image inputs, padding removed."""
    single = row(inputs, i)
    if "image_grid_thw" in inputs:
        grids = inputs["image_grid_thw"]
        single["pixel_values"] = inputs["pixel_values"].split(grids.prod(dim=-1).tolist())[i]
        single["image_grid_thw"] = grids[i : i + 1]
    else:
        single["pixel_values"] = inputs["pixel_values"][i : i + 1]
        if "image_sizes" in inputs:
            single["image_sizes"] = inputs["image_sizes"][i : i + 1]
    return single


def attention_implementations(model):
    """The attention implementation of the model's config and of its language model's."""
    return model.config._attn_implementation, model.model.language_model.config._attn_implementation


def assert_batch_generates_like_each_prompt_alone(model, inputs, method, keep, n=3, **options):
    """Greedy generation of the batch under ``method`` = that of each prompt alone (tokens, step
    logits, kept indices and per-layer counts), and the attention implementation never changes.
    Returns the kept indices of the batch."""
    before = attention_implementations(model)
    with apply_pruning(model, method, keep=keep, **options) as handle:
        assert attention_implementations(model) == before
        batched = greedy_scored(model, inputs, n)
        kept = [k.clone() for k in handle.kept_indices]
        hooks = getattr(handle.attachment, "hooks", None)  # an LLM-stage method's
        counts = hooks.tokens_per_layer if hooks is not None else None
        for i in range(len(kept)):
            single = greedy_scored(model, alone(inputs, i), n)
            assert torch.equal(handle.kept_indices[0], kept[i])
            if counts is not None:
                assert hooks.tokens_per_layer[0] == counts[i]
            assert torch.equal(single.sequences[0, -n:], batched.sequences[i, -n:])
            for got, want in zip(batched.logits, single.logits, strict=True):
                torch.testing.assert_close(got[i], want[0], rtol=1e-4, atol=1e-5)
        assert attention_implementations(model) == before
    assert attention_implementations(model) == before
    return kept
