"""Stage ``efficiency`` (paper Fig. 5, Fig. A, App. D).

    python -m pipeline.efficiency                                            # testbed: outputs/efficiency ...
    python -m pipeline.efficiency --params paper/params.yaml --out paper/outputs/efficiency   # the paper profile

Every timing goes through ``zoo_prune.timing`` (warm-up, then min / median / max of the repeats per
document, averaged over the documents; CUDA synchronised around each timed call when the model is on a
GPU; the load average before and after in ``conditions.json``: a run on a loaded machine, or a timing
whose repeats spread too far, is flagged in the outputs and on the figures). Prefill = one forward of the
prompt with its images (vision encoder + projector + the method's selection + the language model's
prefill), logits of the last position only, as ``generate``'s first step; end-to-end = ``generate`` of
``new_tokens`` greedy tokens. Speed-ups are ratios to the unpruned model timed in the same run.

Testbed (``--params params.yaml``): the testbed model on this CPU (``efficiency.threads`` torch threads),
every method of ``evaluate`` at every budget on ``efficiency.samples`` test images, next to the FLOPs the
ledger (``zoo_prune.flops``) counts on its graph; one LLaMA-7B-width decoder layer (random weights, fp32)
timed at the unpruned and pruned lengths of LLaVA-1.5. Outputs ``--out``, ``--metrics``, ``--figures``.

Paper profile (``--params paper/params.yaml --out <dir>``, everything inside ``<dir>``):

* ``efficiency.csv``: ``paper.efficiency.model`` on ``paper.device`` in ``paper.dtype``, on the first
  ``paper.efficiency.samples`` documents of ``paper.efficiency.task`` (lmms-eval's own prompt and images),
  unpruned and every method the plan runs on it (``pipeline.plan.methods_of``) at each of its budgets:
  prefill and end-to-end ms (``warmup`` untimed runs, then ``repeats``), the prefill split into the
  method's ``sensitivity`` and ``selection`` (its own calls, ``Attachment.timed_calls``), the language
  model's forward (``llm``) and the rest (vision encoder, projector, the prompt's re-layout), each the
  median over the repeats of its seconds; peak memory (``torch.cuda.max_memory_allocated`` on CUDA, n/a
  elsewhere); speed-ups over unpruned, the paper's Fig. 5 speed-ups beside where
  ``analysis/paper_numbers.csv`` gives them; GFLOPs by the ledger (the paper model's configuration in
  ``zoo_prune/configs``, or the loaded checkpoint's own graph for a stand-in or another model);
* ``app_d.csv``: the ledger's TFLOPs by part of every model of ``paper.models`` that has a configuration
  in ``zoo_prune/configs``, each at its budgets with the methods the plan runs on it (one image, the
  ledger's, ``efficiency.text_tokens`` text tokens), the paper's App. D beside (analysis/paper_numbers.csv);
  counted, not measured: it needs no checkpoint and is written even when the timed model is absent
  (then ``skipped.json`` names it and nothing is timed);
* ``conditions.json``, ``metrics.json``, ``figures/`` (prefill and end-to-end bars with the speed-up in
  each, Fig. 5 style; the ledger's bars per model, Fig. A style).
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import figures

from ._common import StageError, load_model, load_params, load_rows, parser, stage, weights_note, write_json
from .evaluate import method_options

UNPRUNED = "unpruned"


@torch.no_grad()
def measure(session, model, inputs: list, method: str, keep, options: dict, *, new_tokens: int, repeats: int,
            warmup: int = 1, device=None, split: bool = False) -> dict:
    """Prefill and end-to-end milliseconds of ``method`` at ``keep`` (None: unpruned) over the prepared
    ``inputs`` (one per document, on the model's device): min / median / max of the repeats, each averaged
    over the documents, and the prompt's text tokens. ``split``: also the prefill's parts (sensitivity,
    selection, llm, rest: medians over the repeats, averaged) and the peak memory of the whole measurement."""
    from zoo_prune import adapter_for, apply_pruning
    from zoo_prune.timing import Parts, peak_memory, reset_peak_memory

    timings = {"prefill": [], "e2e": []}
    text, visual, parts = [], [], []
    label = f"{method}-{keep}" if keep else method
    image_token = model.config.image_token_id
    reset_peak_memory(device)
    with apply_pruning(model, method, keep=keep, **options) if keep else nullcontext() as handle:
        for index, x in enumerate(inputs):
            with Parts(device) as timer:
                if split:
                    for owner, name, part in handle.attachment.timed_calls() if handle else []:
                        timer.wrap(owner, name, part)
                    timer.wrap(adapter_for(model).language_model, "forward", "llm")
                prefill = session.time(lambda: model(**x, logits_to_keep=1), name=f"prefill/{label}/{index}",
                                       repeats=repeats, warmup=warmup, device=device, parts=timer if split else None)
            timings["prefill"].append(prefill)
            timings["e2e"].append(session.time(
                lambda: model.generate(**x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False),
                name=f"e2e/{label}/{index}", repeats=repeats, warmup=warmup, device=device))
            text.append(int((x["input_ids"] != image_token).sum()))
            visual.append(int((x["input_ids"] == image_token).sum()))
            if split:
                rest = statistics.median(t - sum(p.values()) for t, p in zip(prefill.seconds, prefill.parts))
                own = {part: prefill.part(part) for part in ("sensitivity", "selection", "llm")}
                parts.append({**own, "rest": rest})
    result = {"text_tokens": round(statistics.mean(text))}
    if split:
        result["prompt_visual_tokens"] = round(statistics.mean(visual))  # the images' placeholders before pruning
    for kind, items in timings.items():
        result[f"{kind}_ms"] = 1000 * statistics.mean(t.median for t in items)
        result[f"{kind}_min_ms"] = 1000 * statistics.mean(t.minimum for t in items)
        result[f"{kind}_max_ms"] = 1000 * statistics.mean(t.maximum for t in items)
        result[f"{kind}_unsteady"] = any(t.unsteady for t in items)
    if split:
        for part in ("sensitivity", "selection", "llm", "rest"):
            result[f"{part}_ms"] = 1000 * statistics.mean(p[part] for p in parts)
        peak = peak_memory(device)
        result["peak_memory_mib"] = np.nan if peak is None else peak / 2**20
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


def counted(ledger, method: str, keep, options: dict, text_tokens: int) -> dict:
    """GFLOPs by part (``gflops_<part>``) and in all (``gflops``) of one prefill, counted by ``ledger``."""
    from zoo_prune import get_method

    instance = get_method(method, **options) if keep else None
    parts = ledger.parts(instance, keep, text_tokens)
    return {"gflops": sum(parts.values()) / 1e9, **{f"gflops_{part}": value / 1e9 for part, value in parts.items()}}


def flagged(conditions: dict) -> str:
    return (f"FLAGGED, NOT A RESULT: load {conditions['load_average_1min_before']:.1f} before / "
            f"{conditions['load_average_1min_after']:.1f} after on {conditions['cores']} cores, "
            f"{len(conditions['unsteady_timings'])} unsteady timing(s); see conditions.json") if conditions["flagged"] else ""


def condition_metrics(conditions: dict) -> dict:
    return {"conditions/flagged": conditions["flagged"], "conditions/loaded": conditions["loaded"],
            "conditions/torch_threads": conditions["torch_threads"],
            "conditions/load_before": conditions["load_average_1min_before"],
            "conditions/load_after": conditions["load_average_1min_after"],
            "conditions/unsteady_timings": len(conditions["unsteady_timings"])}


def with_speedups(data: pd.DataFrame) -> pd.DataFrame:
    """Speed-ups over the unpruned row of the same run (ratios of the medians) and the FLOP ratio."""
    base = data[data["method"] == UNPRUNED].iloc[0]
    data["prefill_speedup"] = base["prefill_ms"] / data["prefill_ms"]
    data["e2e_speedup"] = base["e2e_ms"] / data["e2e_ms"]
    data["flop_ratio"] = base["gflops"] / data["gflops"]
    return data


# ---------------------------------------------------------------- testbed


def testbed(s, args) -> None:
    from zoo_prune.flops import Ledger
    from zoo_prune.timing import Session
    from zoo_prune.tiny import chat_prompt

    cfg = s.params["efficiency"]
    methods = s.params["evaluate"]["zoo_methods"] + s.params["evaluate"]["baselines"]
    model, processor = load_model(args.model)
    rows = load_rows(args.data, "attribute", cfg["samples"])
    inputs = [processor(images=row["image"], text=chat_prompt(processor, row["question"]), return_tensors="pt")
              for row in rows]
    ledger = Ledger.of(model, "testbed")
    records = []
    configs = [(UNPRUNED, None)] + [(m, k) for m in methods for k in s.params["budgets"]]
    with Session(threads=cfg["threads"], settle=60.0) as session:  # the previous stage's load decays first
        for method, keep in tqdm(configs, desc="efficiency: timing", unit="run"):
            options = method_options(method, s.params)
            result = measure(session, model, inputs, method, keep, options, new_tokens=cfg["new_tokens"],
                             repeats=cfg["repeats"])
            records.append({"method": method, "tokens": keep or ledger.visual_tokens, **result,
                            **counted(ledger, method, keep, options, result["text_tokens"])})
        layers = layer_seconds(session, [n + cfg["text_tokens"] for n in cfg["layer_tokens"]], cfg["layer_repeats"])
    conditions = session.conditions()
    timed = pd.DataFrame(records)
    base = timed[timed["method"] == UNPRUNED].iloc[0]
    timed["speedup"] = base["prefill_ms"] / timed["prefill_ms"]
    timed["flop_ratio"] = base["gflops"] / timed["gflops"]
    out, fig = s.out["out"], s.out["figures"]
    out.mkdir(parents=True)
    timed.to_csv(out / "testbed.csv", index=False)
    layers.to_csv(out / "layer_cpu.csv", index=False)
    write_json(out / "conditions.json", {**conditions, "machine": session.describe()})
    flag = flagged(conditions)
    stamp = " ".join(x for x in (weights_note(args.model), flag) if x)
    cpu = f"testbed model on this CPU, {conditions['torch_threads']} thread(s), mean over {cfg['samples']} test images"
    images = {
        "prefill": figures.save(figures.measured_and_counted(timed, "prefill_ms", "gflops",
                                                              f"prefill (ms, {cpu})", "GFLOPs (ledger)", stamp),
                                fig / "prefill.png"),
        "e2e": figures.save(figures.speed_bars(timed, "e2e_ms", f"end-to-end, {cfg['new_tokens']} new tokens "
                                               f"(ms, {cpu})", stamp), fig / "e2e.png"),
        "layer_cpu": figures.save(figures.layer_times(layers, flag), fig / "layer_cpu.png"),
    }
    metrics = {**condition_metrics(conditions),
               **{f"prefill_ms/{r.method}-{r.tokens}": float(r.prefill_ms) for r in timed.itertuples()},
               **{f"e2e_ms/{r.method}-{r.tokens}": float(r.e2e_ms) for r in timed.itertuples()},
               **{f"gflops/{r.method}-{r.tokens}": float(r.gflops) for r in timed.itertuples()}}
    write_json(s.out["metrics"], metrics)
    s.log(metrics=metrics, tables={"testbed": timed, "layer_cpu": layers}, images=images)


# ---------------------------------------------------------------- paper profile


def app_d(params: dict, text_tokens: int) -> pd.DataFrame:
    """The ledger's TFLOPs by part for every model of ``paper.models`` with a configuration in
    ``zoo_prune/configs``, unpruned and each planned method at each of its budgets (the model's estimator
    for the sensitivity methods), with the paper's App. D value where ``analysis/paper_numbers.csv`` has one."""
    from analysis.paper import paper_numbers
    from zoo_prune import get_method
    from zoo_prune.flops import PARTS, Ledger, paper_models, uses_sensitivity

    from .evaluate import model_options
    from .plan import methods_of

    numbers = paper_numbers()
    numbers = numbers[numbers["table"] == "appD"]
    paper_value = {(r.model, r.method, r.keep): r.value for r in numbers.itertuples()}
    rows = []
    for name, spec in params["paper"]["models"].items():
        if name not in paper_models():
            continue
        ledger = Ledger.paper(name)
        configs = [(UNPRUNED, None, None)] + [(m, k, get_method(m, **model_options(m, params, name)))
                                              for m in methods_of(params, name) for k in spec["budgets"]]
        for method, keep, instance in tqdm(configs, desc=f"efficiency: App. D ledger of {name}", unit="config"):
            if instance is not None and not ledger.supports(instance):
                continue
            parts = ledger.parts(instance, keep, text_tokens)
            tokens = ledger.visual_tokens if keep is None else ledger.keep_tokens(keep)
            estimator = instance.resolve_estimator(ledger.cpu_projector) if instance is not None and \
                uses_sensitivity(instance) else ""
            rows.append({"model": name, "method": method, "keep": keep, "tokens": tokens, "estimator": estimator,
                         "text_tokens": text_tokens, **{f"tflops_{p}": parts[p] / 1e12 for p in PARTS},
                         "tflops": sum(parts.values()) / 1e12,
                         "paper_app_d": paper_value.get((name, method, tokens), np.nan)})
    return pd.DataFrame(rows)


def paper_fig5(model: str) -> dict:
    """``{(method, keep): {"paper_prefill_speedup": x, "paper_e2e_speedup": y, "paper_benchmark": b}}``: the
    speed-ups the paper's text gives for Fig. 5 (analysis/paper_numbers.csv), for ``model``."""
    from analysis.paper import paper_numbers

    numbers = paper_numbers()
    found: dict = {}
    for r in numbers[(numbers["table"] == "fig5") & (numbers["model"] == model)].itertuples():
        found.setdefault((r.method, r.keep), {"paper_benchmark": r.benchmark})[f"paper_{r.metric}"] = r.value
    return found


def document_inputs(processor, documents: list[dict], device, dtype) -> list:
    """Each document as the model's inputs on ``device`` (floating tensors in ``dtype``): its images and
    lmms-eval's prompt text in one user turn of the processor's chat template."""
    inputs = []
    for document in documents:
        if not document["images"]:
            raise StageError(f"document {document['doc_id']} has no image: nothing to prune")
        content = [{"type": "image"} for _ in document["images"]] + [{"type": "text", "text": document["text"]}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs.append(processor(images=document["images"], text=prompt, return_tensors="pt").to(device, dtype))
    return inputs


def paper_profile(s, args) -> None:
    from zoo_prune.flops import Ledger, paper_models
    from zoo_prune.timing import Session

    from . import _paper
    from .evaluate import model_options
    from .plan import methods_of

    paper = s.params["paper"]
    cfg, name = paper["efficiency"], paper["efficiency"]["model"]
    out = s.out["out"]
    (out / "figures").mkdir(parents=True)
    ledger_table = app_d(s.params, s.params["efficiency"]["text_tokens"])
    ledger_table.to_csv(out / "app_d.csv", index=False)
    images = {}
    for model_name in ledger_table["model"].unique():
        data = ledger_table[ledger_table["model"] == model_name]
        images[f"app_d_{model_name}"] = figures.save(
            figures.flops_bars(data, f"{model_name} ({s.params['efficiency']['text_tokens']} text tokens)"),
            out / "figures" / f"app_d_{model_name.replace('.', '_').replace('-', '_')}.png")
    check = {f"paper_check/{r.model}/{r.method}-{r.tokens}_ledger_over_app_d": float(r.tflops / r.paper_app_d)
             for r in ledger_table[ledger_table["paper_app_d"].notna()].itertuples()}
    record = _paper.availability(s.params, name)
    if not record["available"]:
        write_json(out / "metrics.json", check)
        return _paper.skip(out, record, "efficiency")

    device, spec = paper["device"], paper["models"][name]
    model, processor = _paper.load(s.params, name, record)
    documents = _paper.task_documents(s.params, cfg["task"], cfg["samples"])
    if len(documents) < cfg["samples"]:
        raise StageError(f"task {cfg['task']!r} has {len(documents)} documents; paper.efficiency.samples asks for "
                         f"{cfg['samples']}")
    inputs = document_inputs(processor, documents, device, model.dtype)
    standin = _paper.random_weights(record)
    if standin or name not in paper_models():
        ledger = Ledger.of(model, name)
        flops_on = "the loaded checkpoint's own graph (its configuration on the meta device)"
    else:
        ledger, flops_on = Ledger.paper(name), f"zoo_prune/configs/{name}.json"
    fig5 = paper_fig5(name)
    configs = [(UNPRUNED, None)] + [(m, k) for m in methods_of(s.params, name) for k in spec["budgets"]]
    records = []
    with Session(settle=0.0) as session:
        for method, keep in tqdm(configs, desc="efficiency: timing", unit="run"):
            options = {} if keep is None else model_options(method, s.params, name)
            result = measure(session, model, inputs, method, keep, options, new_tokens=cfg["new_tokens"],
                             repeats=cfg["repeats"], warmup=cfg["warmup"], device=device, split=True)
            records.append({"model": name, "method": method, "keep": keep,
                            "tokens": ledger.visual_tokens if keep is None else ledger.keep_tokens(keep), **result,
                            **counted(ledger, method, keep, options, result["text_tokens"]),
                            **fig5.get((method, keep), {})})
    conditions = session.conditions()
    timed = with_speedups(pd.DataFrame(records))
    note = _paper.weights_note(record)
    if note:
        timed["note"] = note  # the table says it too, not only the figures
    timed.to_csv(out / "efficiency.csv", index=False)
    write_json(out / "conditions.json", {**conditions, "machine": session.describe()})
    stamp = " ".join(x for x in (note, flagged(conditions)) if x)
    where = (f"{name} on {device} ({paper['dtype']}), mean over {cfg['samples']} {cfg['task']} documents of the median "
             f"of {cfg['repeats']} after {cfg['warmup']} warm-up")
    images |= {
        "prefill": figures.save(figures.speed_bars(timed, "prefill_ms", f"prefill (ms, {where})", stamp),
                                out / "figures" / "prefill.png"),
        "e2e": figures.save(figures.speed_bars(timed, "e2e_ms", f"end-to-end, {cfg['new_tokens']} new tokens "
                                               f"(ms, {where})", stamp), out / "figures" / "e2e.png"),
    }
    on_cuda = torch.device(device).type == "cuda"
    peak = "torch.cuda.max_memory_allocated" if on_cuda else f"n/a (device {device}: no allocator peak)"
    metrics = {**condition_metrics(conditions), **check, "model": name, "revision": record["revision"],
               "device": device, "dtype": paper["dtype"], "task": cfg["task"], "documents": len(inputs),
               "flops_counted_on": flops_on, "peak_memory": peak, "note": note,
               "flops_image": f"the ledger's image: {ledger.visual_tokens} visual tokens unpruned (the documents' "
                              "prompts hold prompt_visual_tokens) with the documents' mean text tokens",
               **{f"prefill_ms/{r.method}-{r.tokens}": float(r.prefill_ms) for r in timed.itertuples()},
               **{f"e2e_ms/{r.method}-{r.tokens}": float(r.e2e_ms) for r in timed.itertuples()},
               **{f"prefill_speedup/{r.method}-{r.tokens}": float(r.prefill_speedup) for r in timed.itertuples()},
               **{f"e2e_speedup/{r.method}-{r.tokens}": float(r.e2e_speedup) for r in timed.itertuples()},
               **{f"gflops/{r.method}-{r.tokens}": float(r.gflops) for r in timed.itertuples()}}
    write_json(out / "metrics.json", metrics)
    s.log(metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
          tables={"efficiency": timed, "app_d": ledger_table}, images=images)


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--out")
    p.add_argument("--metrics", help="testbed only (the paper profile writes <out>/metrics.json)")
    p.add_argument("--figures", help="testbed only (the paper profile writes <out>/figures)")
    args = p.parse_args(argv)
    paper = load_params(args.params, ["profile"])["profile"] == "paper"
    if paper and not args.out:
        p.error("the paper profile needs --out (paper/dvc.yaml passes it)")
    if paper and (args.metrics or args.figures):
        p.error("the paper profile writes metrics.json and figures/ inside --out")
    args.out = args.out or "outputs/efficiency"
    if paper:
        with stage("efficiency", args, ["paper", "efficiency", "zoo", "baselines", "ablation"], ["out"]) as s:
            paper_profile(s, args)
        return
    args.metrics = args.metrics or "outputs/metrics/efficiency.json"
    args.figures = args.figures or "outputs/figures/efficiency"
    with stage("efficiency", args, ["efficiency", "budgets", "zoo", "baselines", "evaluate"],
               ["out", "metrics", "figures"]) as s:
        testbed(s, args)


if __name__ == "__main__":
    main()
