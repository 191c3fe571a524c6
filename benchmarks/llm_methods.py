"""LLM-stage methods (FastV, SparseVLM) side by side with the unpruned model: prefill time and tokens.

    python benchmarks/llm_methods.py                      # 16-layer LM, width 1024, 576 visual tokens
    python benchmarks/llm_methods.py --layers 32 --width 2048 --repeats 5 --attention eager

A LLaVA-1.5 with random weights (no checkpoint): a small CLIP tower giving 576 visual tokens and a
Llama language model of ``--layers`` x ``--width``, in float32 on the CPU (bf16 on a GPU), one
prompt of one image. For each method and budget it times ``model(**inputs)`` (median of
``--repeats`` after one warm-up; CUDA-synchronised) and reports the visual tokens entering each
layer (layer-averaged and at the last layer), the paper's layer-averaged count, and the prefill's
speed-up over the unpruned model measured in the same run. The model keeps its attention
implementation (``--attention``); only the ranking rows are recomputed. Random weights: the timings
are what the mechanics cost, not a statement about accuracy. The table also goes to
``benchmarks/results/llm_methods.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import transformers as tf
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from zoo_prune import apply_pruning
from zoo_prune.tiny import LLAVA_CHAT_TEMPLATE, chat_prompt, tiny_image, tiny_tokenizer


def build(layers: int, width: int, attention: str, device: str, dtype: torch.dtype):
    tokenizer = tiny_tokenizer()
    vision = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=96, patch_size=4, projection_dim=64)
    text = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=int(2.75 * width) // 64 * 64,
                          num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=width // 64,
                          max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            image_seq_length=576)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(config).to(device, dtype).eval()
    model.set_attn_implementation(attention)
    images = CLIPImageProcessorPil(size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96})
    processor = tf.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=LLAVA_CHAT_TEMPLATE)
    question = "what color is the cat on the left and how many birds are there in the sky above the tree ?"
    inputs = processor(images=tiny_image(0, (120, 160)), text=chat_prompt(processor, question), return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model, {k: v.to(device) for k, v in inputs.items()}


def timed(call, repeats: int, device: str) -> float:
    call()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64])
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, inputs = build(args.layers, args.width, args.attention, device, dtype)
    run = lambda: model(**inputs)  # noqa: E731
    with torch.no_grad():
        base = timed(run, args.repeats, device)
        rows = [("unpruned", "-", 576.0, 576, 576.0, base)]
        for method in ("fastv", "sparsevlm"):
            for keep in args.budgets:
                with apply_pruning(model, method, keep=keep) as handle:
                    seconds = timed(run, args.repeats, device)
                    hooks = handle.attachment.hooks
                    counts = hooks.tokens_per_layer[0]
                    rows.append((method, keep, sum(counts) / len(counts), counts[-1], hooks.average_tokens[0], seconds))
                assert model.config._attn_implementation == args.attention
    lines = [f"LLaVA-1.5 shape, random weights: {args.layers}-layer LM, width {args.width}, {device}, {dtype}, "
             f"{torch.get_num_threads()} threads, attention {args.attention}, prompt {inputs['input_ids'].shape[1]} tokens "
             f"(576 visual), load average {load:.1f} before / {os.getloadavg()[0]:.1f} after.", "",
             "| method | keep | visual tokens / layer (mean of inputs) | at the last layer | paper's average | prefill (ms) | speed-up |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for method, keep, mean, last, paper, seconds in rows:
        lines.append(f"| {method} | {keep} | {mean:.1f} | {last} | {paper:.1f} | {1000 * seconds:.0f} | {base / seconds:.2f}x |")
    print("\n".join(lines))
    out = Path(__file__).parent / "results" / "llm_methods.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
