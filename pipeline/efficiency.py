"""Stage ``efficiency`` (paper Fig. 5, Fig. A, App. D).

* Testbed, measured: prefill time (vision encoder + projector + selection + LLM prefill: one
  forward) and end-to-end latency (prefill + ``new_tokens`` greedy tokens) per method and budget
  on test images (warm-up, then min / median / max of ``repeats`` per image, averaged over images),
  next to the FLOPs counted by the ledger (``zoo_prune.flops``) on the testbed model's own graph.
* Paper models, counted: the ledger's FLOPs by part for each model of ``paper.models`` at its
  budgets, with the paper's App. D beside LLaVA-NeXT-7B (``benchmarks/flops.py`` reconciles the
  conventions; the ledger counts 2 FLOPs per multiply-add on the real graph).
* CPU timing of LLaMA-7B-width decoder layers (random weights, fp32) at the unpruned and pruned
  lengths of LLaVA-1.5: what pruning saves per layer, labelled as CPU.

Every timing runs through ``zoo_prune.timing``: torch threads pinned to ``efficiency.threads``, the
load average before and after recorded in ``conditions.json`` and the metrics; a run on a loaded
machine, or a timing whose repeats spread too far, is flagged in the outputs and on the figures.
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext

import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import figures
from analysis.flops import PAPER_APP_D

from ._common import load_model, load_rows, parser, stage, weights_note, write_json
from .evaluate import method_options


@torch.no_grad()
def measure(session, model, processor, rows, method: str, keep: int | None, options: dict, cfg: dict) -> dict:
    """Prefill and end-to-end milliseconds of ``method`` at ``keep`` over ``rows`` (min / median / max
    of the repeats, each averaged over the rows), and the prompt's text tokens."""
    from zoo_prune import apply_pruning
    from zoo_prune.tiny import chat_prompt

    timings = {"prefill": [], "e2e": []}
    text = []
    new = cfg["new_tokens"]
    label = f"{method}-{keep}" if keep else method
    with apply_pruning(model, method, keep=keep, **options) if keep else nullcontext():
        for index, row in enumerate(rows):
            inputs = processor(images=row["image"], text=chat_prompt(processor, row["question"]), return_tensors="pt")
            timings["prefill"].append(session.time(lambda: model(**inputs), name=f"prefill/{label}/{index}",
                                                   repeats=cfg["repeats"]))
            timings["e2e"].append(session.time(
                lambda: model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False),
                name=f"e2e/{label}/{index}", repeats=cfg["repeats"]))
            text.append(int((inputs["input_ids"] != model.config.image_token_id).sum()))
    result = {"text_tokens": round(statistics.mean(text))}
    for kind, items in timings.items():
        result[f"{kind}_ms"] = 1000 * statistics.mean(t.median for t in items)
        result[f"{kind}_min_ms"] = 1000 * statistics.mean(t.minimum for t in items)
        result[f"{kind}_max_ms"] = 1000 * statistics.mean(t.maximum for t in items)
        result[f"{kind}_unsteady"] = any(t.unsteady for t in items)
    return result


@torch.no_grad()
def layer_seconds(session, lengths: list[int], repeats: int) -> pd.DataFrame:
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
        timing = session.time(lambda: layer(hidden, position_ids=positions, position_embeddings=rope),
                              name=f"layer/{n}", repeats=repeats)
        rows.append({"tokens": n, "seconds": timing.median, "min_seconds": timing.minimum,
                     "max_seconds": timing.maximum, "unsteady": timing.unsteady})
    return pd.DataFrame(rows)


def paper_flops(paper: dict, zoo: dict, methods: list[str], text_tokens: int) -> pd.DataFrame:
    """The ledger's TFLOPs by part for every model of ``paper.models`` (configurations shipped in
    ``zoo_prune/configs``) at its budgets, each sensitivity method with the model's estimator."""
    from zoo_prune import get_method
    from zoo_prune.flops import PARTS, Ledger, paper_models, uses_sensitivity

    rows = []
    for name, spec in paper["models"].items():
        if name not in paper_models():
            continue
        ledger = Ledger.paper(name)
        configs = [("unpruned", None, None)] + [(m, k, get_method(m, **_options(m, zoo, spec))) for m in methods
                                                for k in spec["budgets"]]
        for method, keep, instance in configs:
            if instance is not None and not ledger.supports(instance):
                continue
            parts = ledger.parts(instance, keep, text_tokens)
            tokens = ledger.visual_tokens if keep is None else ledger.keep_tokens(keep)
            estimator = instance.resolve_estimator(ledger.cpu_projector) if instance is not None and \
                uses_sensitivity(instance) else ""
            rows.append({"model": name, "method": method, "tokens": tokens, "estimator": estimator,
                         **{f"tflops_{p}": parts[p] / 1e12 for p in PARTS}, "tflops": sum(parts.values()) / 1e12,
                         "paper_app_d": PAPER_APP_D.get((method, tokens)) if name == "llava-next-7b" else None})
    return pd.DataFrame(rows)


def _options(method: str, zoo: dict, spec: dict) -> dict:
    from zoo_prune import get_method
    from zoo_prune.flops import uses_sensitivity

    if not uses_sensitivity(get_method(method)):
        return {}
    return {"m": zoo["m"], "estimator": spec.get("estimator", zoo["estimator"])}


def main(argv=None) -> None:
    p = parser(__doc__, "efficiency")
    args = p.parse_args(argv)
    with stage("efficiency", args, ["efficiency", "budgets", "zoo", "baselines", "evaluate", "paper"],
               ["out", "metrics", "figures"]) as s:
        from zoo_prune import get_method
        from zoo_prune.flops import Ledger
        from zoo_prune.timing import Session

        cfg = s.params["efficiency"]
        layer_tokens = cfg["layer_tokens"]
        methods = s.params["evaluate"]["zoo_methods"] + s.params["evaluate"]["baselines"]
        model, processor = load_model(args.model)
        rows = load_rows(args.data, "attribute", cfg["samples"])
        ledger = Ledger.of(model, "testbed")
        records = []
        configs = [("unpruned", None)] + [(m, k) for m in methods for k in s.params["budgets"]]
        with Session(threads=cfg["threads"], settle=60.0) as session:  # the previous stage's load decays first
            for method, keep in tqdm(configs, desc="efficiency: timing", unit="run"):
                options = method_options(method, s.params)
                result = measure(session, model, processor, rows, method, keep, options, cfg)
                instance = get_method(method, **options) if keep else None
                parts = ledger.parts(instance, keep, result["text_tokens"])
                records.append({"method": method, "tokens": keep or ledger.visual_tokens, **result,
                                "gflops": sum(parts.values()) / 1e9,
                                **{f"gflops_{part}": value / 1e9 for part, value in parts.items()}})
            layers = layer_seconds(session, [n + cfg["text_tokens"] for n in layer_tokens], cfg["layer_repeats"])
        conditions = session.conditions()
        testbed = pd.DataFrame(records)
        base = testbed[testbed["method"] == "unpruned"].iloc[0]
        testbed["speedup"] = base["prefill_ms"] / testbed["prefill_ms"]
        testbed["flop_ratio"] = base["gflops"] / testbed["gflops"]
        paper = paper_flops(s.params["paper"], s.params["zoo"], methods, cfg["text_tokens"])
        out, fig = s.out["out"], s.out["figures"]
        out.mkdir(parents=True)
        testbed.to_csv(out / "testbed.csv", index=False)
        paper.to_csv(out / "paper_flops.csv", index=False)
        layers.to_csv(out / "layer_cpu.csv", index=False)
        write_json(out / "conditions.json", {**conditions, "machine": session.describe()})
        note = weights_note(args.model)
        flag = (f"FLAGGED, NOT A RESULT: load {conditions['load_average_1min_before']:.1f} before / "
                f"{conditions['load_average_1min_after']:.1f} after on {conditions['cores']} cores, "
                f"{len(conditions['unsteady_timings'])} unsteady timing(s); see conditions.json") if conditions["flagged"] else ""
        stamp = " ".join(x for x in (note, flag) if x)
        cpu = f"testbed model on this CPU, {conditions['torch_threads']} thread(s), mean over {cfg['samples']} test images"
        images = {
            "prefill": figures.save(figures.measured_and_counted(testbed, "prefill_ms", "gflops",
                                                                  f"prefill (ms, {cpu})", "GFLOPs (ledger)", stamp),
                                    fig / "prefill.png"),
            "e2e": figures.save(figures.speed_bars(testbed, "e2e_ms", f"end-to-end, {cfg['new_tokens']} new tokens (ms, {cpu})",
                                                   stamp), fig / "e2e.png"),
            "layer_cpu": figures.save(figures.layer_times(layers, flag), fig / "layer_cpu.png"),
        }
        for name in paper["model"].unique():
            data = paper[paper["model"] == name]
            images[f"flops_{name}"] = figures.save(figures.flops_bars(data, name),
                                                   fig / f"flops_{name.replace('.', '_').replace('-', '_')}.png")
        metrics = {"conditions/flagged": conditions["flagged"], "conditions/loaded": conditions["loaded"],
                   "conditions/torch_threads": conditions["torch_threads"],
                   "conditions/load_before": conditions["load_average_1min_before"],
                   "conditions/load_after": conditions["load_average_1min_after"],
                   "conditions/unsteady_timings": len(conditions["unsteady_timings"]),
                   **{f"prefill_ms/{r.method}-{r.tokens}": float(r.prefill_ms) for r in testbed.itertuples()},
                   **{f"e2e_ms/{r.method}-{r.tokens}": float(r.e2e_ms) for r in testbed.itertuples()},
                   **{f"gflops/{r.method}-{r.tokens}": float(r.gflops) for r in testbed.itertuples()}}
        check = paper[paper["paper_app_d"].notna()]
        for r in check.itertuples():
            metrics[f"paper_check/{r.model}/{r.method}-{r.tokens}_ledger_over_app_d"] = float(r.tflops / r.paper_app_d)
        write_json(s.out["metrics"], metrics)
        s.log(metrics=metrics, tables={"testbed": testbed, "paper_flops": paper, "layer_cpu": layers}, images=images)


if __name__ == "__main__":
    main()
