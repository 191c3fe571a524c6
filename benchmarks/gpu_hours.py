"""GPU-hour ESTIMATES per stage of the paper profile, from counted FLOPs and stated assumptions (not measured).

    python benchmarks/gpu_hours.py                          # paper/params.yaml; a few minutes on 2 cores
    python benchmarks/gpu_hours.py --mfu 0.3 --answer-tokens 5

For every planned run (``pipeline.plan``: model x method x budget x seed) and every document of the profile's
tasks, one document's work comes from the FLOPs ledger (``zoo_prune.flops``: the model built from its
configuration in ``zoo_prune/configs`` on the meta device, counted by part) with the method options the
evaluate stage passes (``pipeline.evaluate.runs``), and its time on a GPU class from a roofline at batch
size 1 (``paper.batch_size``):

    prefill = max(ledger FLOPs in the model's dtype / (fp16 peak x MFU) + sensitivity FLOPs / (fp32 peak x MFU),
                  every weight read once / (memory bandwidth x efficiency))
    decode  = answer tokens x (language-model weights + KV cache) / (memory bandwidth x efficiency)

(the estimators compute in float32 whatever the model's dtype, so their FLOPs run at the fp32 rate; torch's
default float32 matmuls do not use TF32). Task sizes are the documents of each lmms-eval 0.7.3 task's split:
the installed task YAML names the dataset and split (read here), the counts are stated with their source
(``TASKS``; the package does not ship them and this machine has no hub). Not counted: model loading, image
decoding and preprocessing, lmms-eval's scoring, and the per-step overhead of Hugging Face ``generate`` at batch
size 1 (kernel launches, Python), which on a 7B model is often larger than the bandwidth bound used here: take the
hours as a lower bound and calibrate them with one measured entry (``paper.limit: 200``, then scale).

Writes ``benchmarks/results/gpu_hours.md`` (assumptions, tasks, hours per stage and per evaluate run) and
``benchmarks/results/gpu_hours.csv`` (one row per run).
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import evaluate, plan  # noqa: E402
from pipeline.schema import load  # noqa: E402
from zoo_prune import get_method  # noqa: E402
from zoo_prune.flops import Ledger  # noqa: E402


@dataclass(frozen=True)
class GPU:
    name: str
    fp16: float  # dense fp16/bf16 tensor-core peak, FLOP/s
    fp32: float  # fp32 (non-tensor) peak, FLOP/s
    bandwidth: float  # memory bandwidth, bytes/s
    source: str


GPUS = {
    "A100-80GB": GPU("NVIDIA A100 SXM4 80GB", 312e12, 19.5e12, 2.039e12,
                     "NVIDIA A100 datasheet: FP16 tensor 312 TFLOPS dense, FP32 19.5 TFLOPS, HBM2e 2,039 GB/s"),
    "H100-80GB": GPU("NVIDIA H100 SXM5 80GB", 989e12, 67e12, 3.35e12,
                     "NVIDIA H100 datasheet: FP16 tensor 1,979 TFLOPS with sparsity (989 dense), FP32 67 TFLOPS, "
                     "HBM3 3.35 TB/s"),
    "L40S": GPU("NVIDIA L40S 48GB", 362e12, 91.6e12, 0.864e12,
                "NVIDIA L40S datasheet: FP16 tensor 362 TFLOPS dense (733 with sparsity), FP32 91.6 TFLOPS, "
                "GDDR6 864 GB/s"),
}

# task -> ([(documents, images per document)], source of the count). The split is the one the installed
# lmms-eval 0.7.3 task YAML names (printed beside it).
TASKS = {
    "gqa": ([(12578, 1)], "GQA testdev-balanced: 12,578 questions (the split LLaVA-1.5 reports)"),
    "mmbench_en_dev_static": ([(4329, 1)], "MMBench dev (en): 4,329 questions; the HF viewer shows 4.33k-4.38k rows"),
    "mme": ([(2374, 1)], "MME: 1,187 images x 2 questions; HF viewer of lmms-lab/MME test: 2.37k rows"),
    "pope": ([(9000, 1)], "POPE: adversarial, popular, random x 3,000; HF viewer of lmms-lab/POPE test: 9k rows"),
    "scienceqa_img": ([(2017, 1)], "ScienceQA test questions that have an image: 2,017"),
    "vqav2_val": ([(214354, 1)], "VQAv2 val2014: 214,354 questions; HF viewer of lmms-lab/VQAv2 validation: 214k rows"),
    "textvqa_val": ([(5000, 1)], "TextVQA val: 5,000 questions; HF viewer of lmms-lab/textvqa validation: 5k rows"),
    "mmmu_val": ([(900, 1)], "MMMU validation: 900 questions (counted with one image; a few have up to 7)"),
    "seedbench": ([(14233, 1), (3757, 8)], "SEED-Bench-1: 14,233 image + 3,757 video questions (HF viewer: 18k rows); "
                  "lmms-eval gives a video question's 8 frames as 8 images (lmms-eval issue #132)"),
}
BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass
class Assumptions:
    mfu: float = 0.4  # sustained share of the fp16 (fp32) peak in prefill matmuls
    bandwidth_efficiency: float = 0.7  # share of the memory bandwidth reached when streaming the weights
    answer_tokens: int = 3  # decode steps per answer (the prompts ask for a letter, yes / no, a word or a phrase)
    text_tokens: int = 60  # prompt text tokens per document (params efficiency.text_tokens)


@dataclass
class Work:
    """Counted work of some documents (FLOPs in the model's dtype, FLOPs in float32: the estimators) and the
    seconds it takes on each GPU class, each document's roofline taken on its own."""

    flops: float = 0.0
    flops32: float = 0.0
    documents: float = 0
    seconds: dict = field(default_factory=dict)

    def __add__(self, other: "Work") -> "Work":
        keys = set(self.seconds) | set(other.seconds)
        return Work(self.flops + other.flops, self.flops32 + other.flops32, self.documents + other.documents,
                    {k: self.seconds.get(k, 0.0) + other.seconds.get(k, 0.0) for k in keys})

    def __mul__(self, n: float) -> "Work":
        return Work(self.flops * n, self.flops32 * n, self.documents * n, {k: v * n for k, v in self.seconds.items()})

    def hours(self, gpu: str) -> float:
        return self.seconds[gpu] / 3600


def document_work(flops: float, flops32: float, prefill_bytes: float, decode_bytes: float, a: "Assumptions") -> Work:
    """One document: its prefill bound by compute or by reading every weight once, plus its decode steps bound
    by bandwidth (``decode_bytes``: all of them)."""
    seconds = {}
    for name, gpu in GPUS.items():
        compute = flops / (gpu.fp16 * a.mfu) + flops32 / (gpu.fp32 * a.mfu)
        memory = prefill_bytes / (gpu.bandwidth * a.bandwidth_efficiency)
        seconds[name] = max(compute, memory) + decode_bytes / (gpu.bandwidth * a.bandwidth_efficiency)
    return Work(flops, flops32, 1, seconds)


class Model:
    """One paper model's ledger, weight sizes and KV-cache width (from its configuration, on the meta device)."""

    def __init__(self, name: str, dtype: str):
        self.name, self.ledger = name, Ledger.paper(name)
        self.bytes = BYTES[dtype]
        model = self.ledger.model
        embed = model.get_input_embeddings().weight.numel()  # looked up, not read whole
        total = sum(p.numel() for p in model.parameters())
        language = sum(p.numel() for p in self.ledger.language_model.parameters()) + model.lm_head.weight.numel()
        self.weights, self.language_weights = (total - embed) * self.bytes, (language - embed) * self.bytes
        text = self.ledger.config.get_text_config()
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.kv_per_token_layer = 2 * heads * (text.hidden_size // text.num_attention_heads) * self.bytes  # K and V
        self.layers = text.num_hidden_layers

    def document(self, method, keep, images: int, a: Assumptions) -> Work:
        """One document of ``images`` images: each image's vision side as the ledger counts it, the language model
        over all their kept tokens (``method.llm_tokens``) and the text; ``answer_tokens`` decode steps."""
        ledger = self.ledger
        parts = ledger.parts(method, keep, a.text_tokens)
        full = ledger.visual_tokens * images
        if method is None:
            per_layer = [a.text_tokens + full] * self.layers
        else:
            per_layer = method.llm_tokens(full, ledger.keep_tokens(keep) * images, a.text_tokens, self.layers)
        llm = parts["llm"] if images == 1 else ledger.llm(per_layer)
        vision_side = (parts["vision"] + parts["projector"] + parts["selection"]) * images
        kv = sum(per_layer) * self.kv_per_token_layer
        return document_work(vision_side + llm, parts["sensitivity"] * images, self.weights,
                             a.answer_tokens * (self.language_weights + kv), a)

    def run(self, method, keep, tasks: list[str], limit, a: Assumptions) -> Work:
        """One lmms-eval run over ``tasks`` (``limit`` documents per task at most, the mix kept in proportion)."""
        total, one = Work(), {}
        for task in tasks:
            groups, _ = TASKS[task]
            count = sum(n for n, _ in groups)
            scale = 1.0 if limit is None else min(1.0, limit / count)
            for n, images in groups:
                if images not in one:
                    one[images] = self.document(method, keep, images, a)
                total = total + one[images] * (n * scale)
        return total


def method_of(name: str, params: dict, model: str):
    """The method object an evaluate entry runs, with the options pipeline.evaluate passes to lmms-eval."""
    return None if name == evaluate.UNPRUNED else get_method(name, **evaluate.model_options(name, params, model))


def task_splits(tasks: list[str]) -> dict[str, str]:
    """task -> "dataset / subset / split (max_new_tokens)" from the installed lmms-eval task YAML."""
    from lmms_eval.utils import load_yaml_config

    from zoo_prune.rehearsal.tasks import lmms_eval_task_yaml

    found = {}
    for task in tasks:
        config = load_yaml_config(str(lmms_eval_task_yaml(task)), mode="simple")
        where = " / ".join(str(config[k]) for k in ("dataset_path", "dataset_name", "test_split") if config.get(k))
        new = (config.get("generation_kwargs") or {}).get("max_new_tokens")
        found[task] = f"{where} (max_new_tokens {new if new else 'default'})"
    return found


def estimate(params: dict, a: Assumptions) -> tuple[list[dict], list[dict], list[str]]:
    """(one row per evaluate run, one row per stage, notes): work and hours on every GPU class."""
    paper, root = params["paper"], params
    unknown = [t for t in paper["tasks"] if t not in TASKS]
    if unknown:
        raise SystemExit(f"error: paper.tasks {unknown}: no document count known here (TASKS knows {sorted(TASKS)})")
    models = {name: Model(name, paper["dtype"]) for name in paper["models"]}
    entries = plan.build(params)
    runs, stages = [], []

    def add_stage(stage: str, work: Work, count: int, note: str = "") -> None:
        stages.append({"stage": stage, "runs": count, "documents": round(work.documents), "work": work, "note": note,
                       **{g: work.hours(g) for g in GPUS}})

    for name, model in models.items():
        total, count = Work(), 0
        for group in ("evaluate_unpruned", "evaluate_zoo", "evaluate_baseline", "evaluate_seeds"):
            for item in entries[group].values():
                if item["model"] != name:
                    continue
                keep = item.get("keep")
                work = model.run(method_of(item["method"], params, name), keep, paper["tasks"], paper["limit"], a)
                runs.append({"model": name, "run": item["run"], "documents": round(work.documents),
                             **{g: work.hours(g) for g in GPUS}})
                total, count = total + work, count + 1
        add_stage(f"evaluate@{name}", total, count, f"{len(paper['tasks'])} tasks per run")

    sweep = paper["sweep"]
    model = models[sweep["model"]]
    tasks = [sweep["task"]]

    def zoo(**over):
        return method_of("zoo", {**params, "zoo": {**params["zoo"], **over}}, sweep["model"])

    h = sum((model.run(zoo(h=v), sweep["keep"], tasks, sweep["limit"], a) for v in root["sweep"]["h"]), Work())
    add_stage("sweep_h", h, len(root["sweep"]["h"]), f"{sweep['task']}, {sweep['model']}, keep {sweep['keep']}")
    m = sum((model.run(zoo(m=v), sweep["keep"], tasks, sweep["limit"], a) for v in root["sweep"]["m"]), Work())
    m = m + model.run(zoo(estimator="closed_form"), sweep["keep"], tasks, sweep["limit"], a)
    add_stage("sweep_m", m, len(root["sweep"]["m"]) + 1, "the m values and the closed-form line")

    eff = paper["efficiency"]
    model = models[eff["model"]]
    timed = eff["samples"] * (eff["warmup"] + eff["repeats"])
    timing = Assumptions(a.mfu, a.bandwidth_efficiency, eff["new_tokens"], a.text_tokens)
    work, count = model.document(None, None, 1, timing) * timed, 1
    for name in plan.methods_of(params, eff["model"]):  # what the stage times: the plan's methods on that model
        method = method_of(name, params, eff["model"])
        for keep in paper["models"][eff["model"]]["budgets"]:
            work, count = work + model.document(method, keep, 1, timing) * timed, count + 1
    add_stage("efficiency", work, count, f"{eff['samples']} images x {eff['warmup']}+{eff['repeats']} timings, "
              f"{eff['new_tokens']} new tokens")

    sens = paper["sensitivity"]
    for name, model in models.items():
        ledger = model.ledger
        per_image = [ledger.sensitivity(e, m=params["zoo"]["m"]) for e in root["sensitivity"]["estimators"]]
        vision = ledger.vision + ledger.projector_flops(ledger.tokens_per_unit)
        work = document_work(vision, sum(f for f in per_image if f), model.weights - model.language_weights, 0, a) \
            * sens["samples"]
        add_stage(f"sensitivity@{name}", work, 1, f"{sens['samples']} images x the estimators that apply")

    proxy = paper["proxy"]
    model = models[proxy["model"]]
    ledger = model.ledger
    q = root["proxy"]["directions"]
    vision = ledger.vision + ledger.projector_flops(ledger.tokens_per_unit)
    estimator = "fused" if ledger.sensitivity("fused") is not None else "naive"  # the projector side, exact
    per_image = document_work((1 + 2 * q) * vision, ledger.sensitivity(estimator, m=params["zoo"]["m"]),
                              model.weights - model.language_weights, 0, a)
    add_stage("proxy", per_image * (proxy["samples"] * len(proxy["tasks"])), 1,
              f"{proxy['samples']} images x {len(proxy['tasks'])} tasks; backward form: 1 + 2q tower passes, q = {q}")
    return runs, stages, notes(params, models, a)


def notes(params: dict, models: dict, a: Assumptions) -> list[str]:
    """What drives the numbers, computed: the tasks' shares of the documents, and per model what ZOO-Prune's
    float32 sensitivity costs per image beside a whole unpruned document and beside DivPrune's."""
    paper = params["paper"]
    counts = {t: sum(n for n, _ in TASKS[t][0]) for t in paper["tasks"]}
    largest = max(counts, key=counts.get)
    lines = [f"- {largest} holds {counts[largest] / sum(counts.values()):.0%} of a run's {sum(counts.values()):,} "
             "documents: `paper.limit` (documents per task) is the knob that shortens every evaluate run."]
    for name, model in models.items():
        keep = min(paper["models"][name]["budgets"])
        zoo, divprune = method_of("zoo", params, name), method_of("divprune", params, name)
        sensitivity = model.ledger.parts(zoo, keep, a.text_tokens)["sensitivity"]
        unpruned, div = model.document(None, None, 1, a), model.document(divprune, keep, 1, a)
        per_gpu = ", ".join(f"{sensitivity / (gpu.fp32 * a.mfu) * 1e3:,.0f} ms on {g} (whole unpruned document "
                            f"{unpruned.seconds[g] * 1e3:,.0f} ms, DivPrune's at {keep}: "
                            f"{div.seconds[g] * 1e3:,.0f} ms)" for g, gpu in GPUS.items())
        estimator = zoo.resolve_estimator(model.ledger.cpu_projector) if zoo.estimator == "auto" else zoo.estimator
        lines.append(f"- {name}: ZOO-Prune's sensitivity ({estimator}, "
                     f"m = {zoo.m}, float32) is {sensitivity / 1e12:.2f} TFLOPs per image: {per_gpu}.")
    if "seedbench" in paper["tasks"]:
        lines.append("- SEED-Bench's video questions (8 frames each; no table reads seed_video) put 8 images in one "
                     "prompt: " + ", ".join(f"{n} {8 * m.ledger.visual_tokens:,} visual tokens unpruned"
                                            for n, m in models.items()) + " (Vicuna-based LLaVA models were trained "
                     "with 4,096 positions).")
    return lines


def hours(value: float) -> str:
    return f"{value:,.1f}" if value >= 0.1 else f"{value:.3f}"


def report(params_path, params: dict, a: Assumptions, runs: list[dict], stages: list[dict], found: list[str]) -> str:
    paper = params["paper"]
    names = list(GPUS)
    total = {g: sum(s[g] for s in stages) for g in names}
    lines = [
        "# GPU-hour estimates of the paper profile (ESTIMATES from counted FLOPs, not measurements)", "",
        f"`python benchmarks/gpu_hours.py --params {params_path}`: every planned run of `{params_path}` "
        f"(paper.limit = {paper['limit']}, batch size {paper['batch_size']}, {paper['dtype']}), each document's work "
        "counted by the FLOPs ledger (`zoo_prune.flops`, the models' configurations in `zoo_prune/configs`), turned "
        "into time by a roofline with the assumptions below. Not counted: model loading, image preprocessing, "
        "lmms-eval's scoring, and Hugging Face `generate`'s per-step overhead at batch size 1, which on a 7B model is "
        "often larger than the bandwidth bound: read these as lower bounds and calibrate with one measured run "
        "(e.g. `paper.limit: 200` on one entry, then scale).", "",
        "## Assumptions", "",
        f"- prefill: max(FLOPs in {paper['dtype']} / (fp16 tensor peak x MFU {a.mfu}) + sensitivity FLOPs (float32, "
        f"as the estimators compute) / (fp32 peak x MFU {a.mfu}), all weights read once / (bandwidth x "
        f"{a.bandwidth_efficiency}))",
        f"- decode: {a.answer_tokens} steps per answer (the prompts ask for a letter, yes / no or a short phrase), "
        f"each reading the language model's weights and the KV cache at bandwidth x {a.bandwidth_efficiency}",
        f"- {a.text_tokens} text tokens per prompt (params efficiency.text_tokens; option lists make MMBench, "
        "ScienceQA, SEED-Bench and MMMU prompts longer: their pruned prefills are underestimated a little)",
        "- one image per document as the ledger builds it: LLaVA-1.5 336 px (576 tokens), LLaVA-NeXT its 5-patch "
        "image (2,880 tokens: the largest), Qwen2.5-VL 896 x 896 (1,024 tokens; real images vary)", "",
        "| GPU class | fp16 dense | fp32 | bandwidth | source |", "|---|---:|---:|---:|---|",
        *[f"| {k} | {g.fp16 / 1e12:,.0f} TFLOPS | {g.fp32 / 1e12:,.1f} TFLOPS | {g.bandwidth / 1e12:,.2f} TB/s | "
          f"{g.source} |" for k, g in GPUS.items()], "",
        "## Tasks (documents per run)", "",
        "| task | lmms-eval 0.7.3 dataset / split (its YAML) | documents | images | count's source |",
        "|---|---|---:|---:|---|"]
    splits = task_splits(paper["tasks"])
    for task in paper["tasks"]:
        groups, source = TASKS[task]
        lines.append(f"| {task} | {splits[task]} | {sum(n for n, _ in groups):,} | "
                     f"{' + '.join(f'{n:,} x {i}' for n, i in groups)} | {source} |")
    lines += ["", "## GPU hours per stage", "",
              "| stage | runs | documents | PFLOPs (counted) | " + " | ".join(f"{g} h" for g in names) + " | what |",
              "|---|---:|---:|---:|" + "---:|" * len(names) + "---|"]
    for s in stages:
        work = s["work"]
        lines.append(f"| {s['stage']} | {s['runs']} | {s['documents']:,} | {(work.flops + work.flops32) / 1e15:,.1f} | "
                     + " | ".join(hours(s[g]) for g in names) + f" | {s['note']} |")
    lines.append(f"| **all** | {sum(s['runs'] for s in stages)} | {sum(s['documents'] for s in stages):,} | | "
                 + " | ".join(f"**{hours(total[g])}**" for g in names) + " | |")
    longest = max(runs, key=lambda r: r[names[0]])
    lines += ["", f"On G GPUs of a class (pipeline.gpus, one entry per GPU) the wall time is at least max(all / G, the "
              f"longest run): the longest is {longest['model']} {longest['run']} "
              f"({', '.join(f'{hours(longest[g])} h on {g}' for g in names)}).", "",
              "## What drives them", "", *found, "",
              "## GPU hours per evaluate run", "",
              "| model | run | documents | " + " | ".join(f"{g} h" for g in names) + " |",
              "|---|---|---:|" + "---:|" * len(names)]
    lines += [f"| {r['model']} | {r['run']} | {r['documents']:,} | " + " | ".join(hours(r[g]) for g in names) + " |"
              for r in runs]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="paper/params.yaml")
    p.add_argument("--mfu", type=float, default=Assumptions.mfu)
    p.add_argument("--bandwidth-efficiency", type=float, default=Assumptions.bandwidth_efficiency)
    p.add_argument("--answer-tokens", type=int, default=Assumptions.answer_tokens)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    params = load(args.params)
    a = Assumptions(args.mfu, args.bandwidth_efficiency, args.answer_tokens, params["efficiency"]["text_tokens"])
    runs, stages, found = estimate(params, a)
    text = report(args.params, params, a, runs, stages, found)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_hours.md").write_text(text)
    with open(out / "gpu_hours.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in runs)
    print(text)


if __name__ == "__main__":
    main()
