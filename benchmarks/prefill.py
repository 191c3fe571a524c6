"""Measured prefill of LLaVA-1.5-7B's shapes on this machine, every method x budget, side by side.

    python benchmarks/prefill.py                    # about 3-6 minutes on 2 cores
    python benchmarks/prefill.py --layers 4 --repeats 5

RANDOM WEIGHTS (no checkpoint: timings depend on shapes only, the kept tokens are not meaningful).
Built from ``zoo_prune/configs/llava-1.5-7b.json`` with transformers' own classes, in float32 on
the CPU: the CLIP ViT-L/14-336 tower (``CLIPVisionModel``), the projector
(``LlavaMultiModalProjector``) and ``--layers`` LLaMA-7B decoder layers (``LlamaDecoderLayer``).
In one run, each component is timed (warm-up, then the median of ``--repeats``; zoo_prune.timing):

* the tower on one 336 x 336 image; the projector on 576 tokens (and on k, for vision-kind methods);
* each sensitivity estimator (naive, fused, lowrank, closed_form; m = 64) on 576 tokens, its per-model
  precomputation (SVD, Gram matrix) excluded and reported apart;
* each registered method's own selection at 192 / 128 / 64 tokens (``reduce``, or a vision-kind
  method's ``merge``; given the sensitivities);
* the decoder stack at every token count a method's layers see (``method.llm_tokens``: 576 + text,
  k + text, and FastV's full-length early layers), its time divided by ``--layers`` and scaled to
  LLaMA-7B's 32 layers (an extrapolation: the 32 layers are identical in shape).

A method's prefill is the sum of its components' medians; its speed-up is unpruned / method, next to
its FLOP ratio from the ledger (``zoo_prune.flops``, the same shapes and text tokens). Sensitivity
methods appear once per estimator (``zoo:closed_form`` ...). Not timed: VisionZip's CLS-attention
read-out inside the tower and FastV's last-token attention ranking (both small; see the README).
Writes ``benchmarks/results/prefill.json`` and ``.md`` with the machine's conditions (threads,
load before / after; a loaded run or an unsteady timing is flagged in the table's header).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo_prune import ESTIMATORS, available_methods, get_method, precompute, zo_sensitivity  # noqa: E402
from zoo_prune.flops import (DEFAULT_TEXT_TOKENS, PARTS, UNPRUNED, Ledger, meta_model, paper_config,  # noqa: E402
                             uses_sensitivity)
from zoo_prune.timing import Session  # noqa: E402

MODEL = "llava-1.5-7b"
BUDGETS = (192, 128, 64)
ACCEPTANCE = ("zoo:closed_form", "divprune", 64, 0.9)  # closed-form ZOO-Prune >= 0.9 x DivPrune's speed-up
# Unsteady timings (zoo_prune.timing) disqualify the run when their spreads add up to more than this
# share of the unpruned prefill (a few ms of jitter on a 5 ms selection cannot move a ratio here).
MATERIAL = 0.01


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return module.eval()


def build(config, layers: int):
    """Tower, projector and ``layers`` decoder layers of ``config`` with random float32 weights."""
    from transformers import CLIPVisionModel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config.vision_config._attn_implementation = "sdpa"
    text = config.text_config
    text._attn_implementation = "sdpa"
    tower = randomise(CLIPVisionModel(config.vision_config), 0)
    projector = randomise(LlavaMultiModalProjector(config), 1)
    stack = torch.nn.ModuleList([randomise(LlamaDecoderLayer(text, layer_idx=i), 2 + i) for i in range(layers)])
    return tower, projector, stack, LlamaRotaryEmbedding(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built and timed (of 32; each ~0.8 GB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (pinned for the run)")
    parser.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/prefill.json"))
    args = parser.parse_args()

    config = paper_config(MODEL)
    n_layers = config.text_config.num_hidden_layers
    side = config.vision_config.image_size // config.vision_config.patch_size
    n = side * side
    text = args.text_tokens
    methods = [get_method(name) for name in available_methods()]
    print(f"building {MODEL} parts with random weights ({args.layers} of {n_layers} decoder layers) ...", flush=True)
    torch.manual_seed(0)
    tower, projector, stack, rotary = build(config, args.layers)
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size, generator=generator)
    features = torch.randn(n, projector.linear_1.in_features, generator=generator)
    projected = torch.randn(n, projector.linear_2.out_features, generator=generator)
    scores = torch.rand(n, generator=generator)
    width = config.text_config.hidden_size
    timings: dict[str, dict] = {}
    precompute_s: dict[str, float] = {}

    def decoder(tokens: int):
        hidden = torch.randn(1, tokens, width, generator=generator)
        positions = torch.arange(tokens)[None]
        rope = rotary(hidden, positions)

        def run():
            h = hidden
            for layer in stack:
                h = layer(h, position_ids=positions, position_embeddings=rope)
            return h

        return run

    with torch.no_grad(), Session(threads=args.threads) as session:
        def timed(name, call, **options):
            timing = session.time(call, name=name, repeats=options.pop("repeats", args.repeats), **options)
            timings[name] = {"median_s": timing.median, "min_s": timing.minimum, "max_s": timing.maximum,
                             "repeats": len(timing.seconds), "unsteady": timing.unsteady}
            print(f"  {name}: {timing.median * 1e3:.1f} ms (min {timing.minimum * 1e3:.1f}, max {timing.maximum * 1e3:.1f}, "
                  f"{len(timing.seconds)} repeats)", flush=True)
            return timing.median

        timed("vision", lambda: tower(pixels, output_hidden_states=True))
        timed(f"projector/{n}", lambda: projector(features))
        for estimator in ESTIMATORS:
            start = time.perf_counter()
            precompute(projector, estimator)
            precompute_s[estimator] = time.perf_counter() - start
            slow = estimator == "naive"  # ~20 s a call: one untimed warm-up would double the run
            timed(f"sensitivity/{estimator}",
                  lambda e=estimator: zo_sensitivity(projector, features, m=64, seed=0, estimator=e),
                  warmup=0 if slow else 1, repeats=1 if slow else args.repeats)
        lengths = {text + n}
        for method in methods:
            for k in BUDGETS:
                lengths.update(method.llm_tokens(n, k, text, n_layers))
                if method.kind == "vision":
                    vision = config.vision_config
                    hidden = torch.randn(1, n + 1, vision.hidden_size, generator=generator)
                    record = {"cls_attention": torch.rand(1, n, generator=generator),
                              "keys": torch.randn(1, n + 1, vision.hidden_size // vision.num_attention_heads,
                                                  generator=generator)}
                    timed(f"selection/{method.name}/{k}", lambda m=method, k=k: m.merge(hidden, record, [0], k))
                    timed(f"projector/{k}", lambda k=k: projector(features[:k]))
                elif method.kind == "projector":
                    chooser = method
                    if uses_sensitivity(method):
                        chooser = copy.copy(method)
                        chooser.sensitivity = lambda features, projector: scores[None]  # timed apart
                    timed(f"selection/{method.name}/{k}",
                          lambda c=chooser, k=k: c.reduce(features[None], projected[None], k, projector=projector,
                                                          grid=(side, side)))
        for tokens in sorted(lengths, reverse=True):
            timed(f"decoder/{tokens}", decoder(tokens))

    conditions = session.conditions()
    per_layer = {t: timings[f"decoder/{t}"]["median_s"] / args.layers for t in lengths}

    # counted on the same projector module (its SVD and Gram matrix are cached by then)
    ledger = Ledger(meta_model(config), MODEL, cpu_projector=projector)

    def components(method, k, estimator=None) -> dict:
        """Measured seconds by part for ``method`` at ``k`` (None: unpruned)."""
        parts = dict.fromkeys(PARTS, 0.0)
        parts["vision"] = timings["vision"]["median_s"]
        if method is None:
            parts["projector"] = timings[f"projector/{n}"]["median_s"]
            parts["llm"] = n_layers * per_layer[text + n]
            return parts
        parts["projector"] = timings[f"projector/{k if method.kind == 'vision' else n}"]["median_s"]
        if estimator is not None:
            parts["sensitivity"] = timings[f"sensitivity/{estimator}"]["median_s"]
        if f"selection/{method.name}/{k}" in timings:
            parts["selection"] = timings[f"selection/{method.name}/{k}"]["median_s"]
        parts["llm"] = sum(per_layer[t] for t in method.llm_tokens(n, k, text, n_layers))
        return parts

    rows = []
    base_s = components(None, None)
    base_flops = ledger.parts(None, None, text)
    rows.append({"method": UNPRUNED, "keep": n, "seconds": base_s, "flops": base_flops})
    for method in methods:
        variants = [(method.name, None)]
        if uses_sensitivity(method):
            variants = [(f"{method.name}:{e}", e) for e in ESTIMATORS]
        for k in BUDGETS:
            for label, estimator in variants:
                rows.append({"method": label, "keep": k, "seconds": components(method, k, estimator),
                             "flops": ledger.parts(method, k, text, estimator)})
    total_base, flops_base = sum(base_s.values()), sum(base_flops.values())
    for row in rows:
        row["total_s"] = sum(row["seconds"].values())
        row["total_flops"] = sum(row["flops"].values())
        row["speedup"] = total_base / row["total_s"]
        row["flop_ratio"] = flops_base / row["total_flops"]

    lookup = {(r["method"], r["keep"]): r for r in rows}
    zoo_name, ref_name, k, needed = ACCEPTANCE
    achieved = lookup[(zoo_name, k)]["speedup"] / lookup[(ref_name, k)]["speedup"]
    result = {
        "model": MODEL, "weights": "random (shapes only)", "dtype": "float32", "device": "cpu",
        "decoder_layers_timed": args.layers, "decoder_layers_scaled_to": n_layers, "text_tokens": text,
        "repeats": args.repeats, "conditions": conditions, "precompute_s": precompute_s,
        "timings": timings, "rows": rows,
        "acceptance": {"rule": f"{zoo_name} speed-up >= {needed} x {ref_name}'s at {k} tokens",
                       "reference": ref_name, "keep": k, "ratio": achieved, "holds": achieved >= needed},
    }
    judge(result, total_base)
    text_md = render(result, total_base, flops_base)
    print(text_md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(text_md + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


def judge(result: dict, total_base: float) -> None:
    """The run is flagged when the machine was loaded, or when its unsteady timings' spreads add up to
    more than ``MATERIAL`` of the unpruned prefill; immaterial ones are listed, not disqualifying."""
    c = result["conditions"]
    c["unsteady_spread_s"] = sum(result["timings"][n]["max_s"] - result["timings"][n]["min_s"]
                                 for n in c["unsteady_timings"])
    c["unsteady_material"] = c["unsteady_spread_s"] > MATERIAL * total_base
    c["flagged"] = c["loaded"] or c["unsteady_material"]


def render(result: dict, total_base: float, flops_base: float) -> str:
    c = result["conditions"]
    flag = "**FLAGGED: timings taken on a loaded machine or unsteady; not a result.** " if c["flagged"] else ""
    if c["unsteady_timings"] and not c["unsteady_material"]:
        flag += (f"(Unsteady but immaterial: {', '.join(c['unsteady_timings'])}, spreads adding up to "
                 f"{c['unsteady_spread_s'] * 1e3:.1f} ms, {c['unsteady_spread_s'] / total_base:.3%} of the unpruned "
                 "prefill.) ")
    lines = [
        f"{flag}LLaVA-1.5-7B prefill on this CPU, **random weights** ({result['dtype']}, {c['torch_threads']} torch "
        f"threads on {c['cores']} cores, 1-min load average {c['load_average_1min_before']:.2f} before / "
        f"{c['load_average_1min_after']:.2f} after{' -- LOADED' if c['loaded'] else ', not loaded'}); "
        f"{result['decoder_layers_timed']} of {result['decoder_layers_scaled_to']} decoder layers timed, per-layer time "
        f"scaled to {result['decoder_layers_scaled_to']} layers; {result['text_tokens']} text tokens; median of "
        f"{result['repeats']} repeats after a warm-up (naive: one run). Unpruned: {total_base:.2f} s, "
        f"{flops_base / 1e12:.2f} TFLOPs (ledger).",
        "",
        "| method | tokens | vision | projector | sensitivity | selection | LLM (x32) | prefill | speed-up | FLOP ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        s = row["seconds"]
        lines.append(
            f"| {row['method']} | {row['keep']} | {s['vision']:.2f} s | {s['projector'] * 1e3:.0f} ms | "
            f"{s['sensitivity']:.3f} s | {s['selection'] * 1e3:.1f} ms | {s['llm']:.2f} s | {row['total_s']:.2f} s | "
            f"{row['speedup']:.2f}x | {row['flop_ratio']:.2f}x |")
    lines += ["", "Sensitivity overhead per image (m = 64, N = 576) as a share of the unpruned prefill, measured and "
                  "counted:", "",
              "| estimator | time | share of unpruned time | TFLOPs | share of unpruned FLOPs | one-off precompute |",
              "|---|---:|---:|---:|---:|---:|"]
    anchor = next(r for r in result["rows"] if r["flops"]["sensitivity"])["method"].split(":")[0]
    for row in result["rows"]:
        name, _, estimator = row["method"].partition(":")
        if name != anchor or row["keep"] != result["rows"][-1]["keep"] or not estimator:
            continue
        t, f = row["seconds"]["sensitivity"], row["flops"]["sensitivity"]
        lines.append(f"| {estimator} | {t:.3f} s | {t / total_base:.1%} | {f / 1e12:.3f} | {f / flops_base:.1%} | "
                     f"{result['precompute_s'][estimator]:.2f} s |")
    a = result["acceptance"]
    lookup = {(r["method"], r["keep"]): r for r in result["rows"]}
    k = a["keep"]
    fused, ref = lookup.get((f"{anchor}:fused", k)), lookup[(a["reference"], k)]
    lines += ["", f"Acceptance: {a['rule']}: {a['ratio']:.3f} ({'holds' if a['holds'] else 'FAILS'})."]
    if fused:
        lines.append(
            f"`fused` (exact, the paper's estimator) reaches {fused['speedup'] / ref['speedup']:.3f} of "
            f"{a['reference']}'s speed-up at {k} tokens: its {fused['seconds']['sensitivity']:.2f} s "
            f"({fused['seconds']['sensitivity'] / total_base:.0%} of the unpruned prefill) is the second layer applied "
            f"to N x m = {576 * 64} activation differences ({fused['flops']['sensitivity'] / 1e12:.2f} TFLOPs, "
            f"{fused['flops']['sensitivity'] / flops_base:.0%} of the unpruned prefill's FLOPs).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
