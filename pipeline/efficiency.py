"""Stage ``efficiency`` (paper Fig. 5, Fig. A, App. D).

* Testbed, measured: prefill time (vision encoder + projector + selection + LLM prefill: one
  forward), end-to-end latency (prefill + ``new_tokens`` greedy tokens) and analytic FLOPs, per
  method and budget, on test images (median of ``repeats`` per image, mean over images).
* Paper models, by formula (``analysis.flops``): TFLOPs per method and budget, with the check
  against App. D (LLaVA-NeXT-7B unpruned at 2880 tokens: 11.8 TFLOPs) reported as a ratio.
* CPU timing of one decoder layer of 7B width (LLaMA-7B sizes, random weights, fp32) at the
  unpruned and pruned lengths of LLaVA-1.5: what pruning saves per layer, labelled as CPU.
"""

from __future__ import annotations

import statistics
import time

import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import figures, flops

from ._common import load_model, load_rows, parser, stage, weights_note, write_json
from .evaluate import method_options

SENSITIVITY_METHODS = ("zoo", "sum_fusion", "sensitivity_only")


def timed(call, repeats: int) -> float:
    """Median seconds of ``call()`` over ``repeats`` runs (after one warm-up)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(model, processor, rows, method: str, keep: int | None, options: dict, cfg: dict) -> dict:
    """Mean prefill and end-to-end seconds of ``method`` at ``keep`` over ``rows``, and the tokens it kept."""
    from contextlib import nullcontext

    from zoo_prune import apply_pruning
    from zoo_prune.tiny import chat_prompt

    prefill, e2e, text = [], [], []
    with apply_pruning(model, method, keep=keep, **options) if keep else nullcontext():
        for row in rows:
            inputs = processor(images=row["image"], text=chat_prompt(processor, row["question"]), return_tensors="pt")
            new = cfg["new_tokens"]
            prefill.append(timed(lambda: model(**inputs), cfg["repeats"]))
            e2e.append(timed(lambda: model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False),
                             cfg["repeats"]))
            text.append(int((inputs["input_ids"] != model.config.image_token_id).sum()))
    return {"prefill_ms": 1000 * statistics.mean(prefill), "e2e_ms": 1000 * statistics.mean(e2e),
            "text_tokens": round(statistics.mean(text))}


@torch.no_grad()
def layer_seconds(lengths: list[int], repeats: int) -> pd.DataFrame:
    """Seconds per forward of one LLaMA-7B-width decoder layer (random weights, fp32) at each length."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, layer_idx=0)
    layer = layer.to_empty(device="cpu").eval()
    for parameter in layer.parameters():
        parameter.normal_(0, 0.02)
    rotary = LlamaRotaryEmbedding(config)
    rows = []
    for n in lengths:
        hidden = torch.randn(1, n, 4096)
        positions = torch.arange(n)[None]
        rope = rotary(hidden, positions)
        rows.append({"tokens": n, "seconds": timed(lambda: layer(hidden, position_ids=positions,
                                                                 position_embeddings=rope), repeats)})
    return pd.DataFrame(rows)


def paper_flops(paper: dict, m: int, text_tokens: int, methods: list[str]) -> pd.DataFrame:
    """TFLOPs by formula for the LLaVA models of ``paper.models`` at their budgets, and App. D where it exists."""
    rows = []
    for name, spec in paper["models"].items():
        if name not in flops.PAPER_MODELS:
            continue  # Qwen2.5-VL: dynamic resolution, no fixed token count
        dims = flops.PAPER_MODELS[name]
        full = dims.tokens * dims.patches
        estimator = spec.get("estimator", "fused")
        for method, keep in [("unpruned", full)] + [(m_, k) for m_ in methods for k in spec["budgets"]]:
            tflops = flops.prefill_flops(dims, keep, text_tokens, method, m, estimator)["total"] / 1e12
            llm_visual = flops.prefill_flops(dims, keep, 0, "unpruned")["llm"] / 1e12  # FastV convention: LLM on visual tokens
            reference = flops.PAPER_APP_D.get(("divprune" if method == "visionzip" else method, keep)) \
                if name == "llava-next-7b" else None
            rows.append({"model": name, "method": method, "tokens": keep, "tflops": tflops,
                         "tflops_llm_visual_only": llm_visual, "paper_app_d": reference})
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    p = parser(__doc__, "efficiency")
    args = p.parse_args(argv)
    with stage("efficiency", args, ["efficiency", "budgets", "zoo", "baselines", "evaluate", "paper"],
               ["out", "metrics", "figures"]) as s:
        from zoo_prune import get_method

        cfg = s.params["efficiency"]
        layer_tokens = cfg["layer_tokens"]
        methods = s.params["evaluate"]["zoo_methods"] + s.params["evaluate"]["baselines"]
        model, processor = load_model(args.model)
        rows = load_rows(args.data, "attribute", cfg["samples"])
        dims = flops.dims_of(model.config)
        estimator = get_method("zoo", estimator=s.params["zoo"]["estimator"]).resolve_estimator(model.model.multi_modal_projector)
        records = []
        configs = [("unpruned", None)] + [(m, k) for m in methods for k in s.params["budgets"]]
        for method, keep in tqdm(configs, desc="efficiency: timing", unit="run"):
            result = measure(model, processor, rows, method, keep, method_options(method, s.params), cfg)
            kept = keep or dims.tokens
            gflops = flops.prefill_flops(dims, kept, result["text_tokens"], method, s.params["zoo"]["m"], estimator)
            records.append({"method": method, "tokens": kept, **result, "gflops": gflops["total"] / 1e9,
                            "gflops_pruning": gflops["pruning"] / 1e9})
        testbed = pd.DataFrame(records)
        paper = paper_flops(s.params["paper"], s.params["zoo"]["m"], cfg["text_tokens"], ["divprune", "visionzip", "zoo"])
        layers = layer_seconds([n + cfg["text_tokens"] for n in layer_tokens],
                               cfg["layer_repeats"])
        out, fig = s.out["out"], s.out["figures"]
        out.mkdir(parents=True)
        testbed.to_csv(out / "testbed.csv", index=False)
        paper.to_csv(out / "paper_flops.csv", index=False)
        layers.to_csv(out / "layer_cpu.csv", index=False)
        note = weights_note(args.model)
        cpu = f"testbed model on this CPU, mean over {cfg['samples']} test images"
        images = {
            "prefill": figures.save(figures.speed_bars(testbed, "prefill_ms", f"prefill (ms, {cpu})", note), fig / "prefill.png"),
            "e2e": figures.save(figures.speed_bars(testbed, "e2e_ms", f"end-to-end, {cfg['new_tokens']} new tokens (ms, {cpu})",
                                                   note), fig / "e2e.png"),
            "flops_next": figures.save(figures.flops_bars(paper[paper["model"] == "llava-next-7b"], "LLaVA-NeXT-7B"),
                                       fig / "flops_llava_next_7b.png"),
            "layer_cpu": figures.save(figures.layer_times(layers), fig / "layer_cpu.png"),
        }
        check = paper[(paper["model"] == "llava-next-7b") & paper["paper_app_d"].notna()]
        unpruned = check[check["method"] == "unpruned"].iloc[0]
        metrics = {"paper_check/llava_next_7b_unpruned_tflops": float(unpruned["tflops"]),
                   "paper_check/ratio_to_app_d_11.8": float(unpruned["tflops"] / unpruned["paper_app_d"]),
                   "paper_check/llm_visual_only_ratio_to_app_d_11.8":
                       float(unpruned["tflops_llm_visual_only"] / unpruned["paper_app_d"]),
                   **{f"prefill_ms/{r.method}-{r.tokens}": float(r.prefill_ms) for r in testbed.itertuples()},
                   **{f"e2e_ms/{r.method}-{r.tokens}": float(r.e2e_ms) for r in testbed.itertuples()}}
        write_json(s.out["metrics"], metrics)
        s.log(metrics=metrics, tables={"testbed": testbed, "paper_flops": paper, "layer_cpu": layers}, images=images)


if __name__ == "__main__":
    main()
