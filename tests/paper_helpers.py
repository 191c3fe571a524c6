"""A paper-profile workspace written by hand (shared by test_paper_results and test_notebooks): params with
four tasks and four models, their evaluate entries with known answers, checkpoint records of random-weight
stand-ins, one skipped model, one missing entry."""

import csv
import json
import shutil
from pathlib import Path

import yaml

from pipeline_helpers import ROOT

TASKS = {"gqa": "gqa", "mmbench_en_dev_static": "mmbench", "mme": "mme", "pope": "pope"}
# an lmms-eval results entry per task: the metric keys lmms-eval writes (MME: two, summed; MMBench: percent)
METRICS = {"gqa": ("exact_match",), "mmbench_en_dev_static": ("gpt_eval_score",),
           "mme": ("mme_perception_score", "mme_cognition_score"), "pope": ("pope_f1_score",)}

# per-question correctness of GQA (the only task here with a 0/1 outcome per question: samples.csv)
GQA = {"unpruned": [1, 1, 1, 0], "zoo": [1, 0, 1, 0], "divprune": [0, 0, 1, 0], "sparsevlm": [0, 0, 0, 0],
       "sensitivity_only": [0, 1, 0, 0], "sum_fusion": [1, 1, 0, 0]}
# the other tasks' scores as lmms-eval reports them: MMBench in percent, MME perception and cognition, POPE F1
OTHER = {"unpruned": (80.0, (1500.0, 300.0), 0.8), "zoo": (60.0, (1200.0, 300.0), 0.6),
         "divprune": (40.0, (900.0, 300.0), 0.4), "sparsevlm": (20.0, (600.0, 300.0), 0.2),
         "sensitivity_only": (40.0, (1500.0, 300.0), 0.4), "sum_fusion": (80.0, (900.0, 300.0), 0.8)}
SKIP_REASON = "checkpoint 'llava-hf/llava-1.5-13b-hf' is neither a local folder nor in the Hugging Face cache"


def paper_params(root: Path) -> Path:
    """``root/params.yaml``: paper/params.yaml's overlay with paper.dir = root (absolute), four tasks, small models."""
    raw = yaml.safe_load((ROOT / "paper" / "params.yaml").read_text())
    raw["base"] = str(ROOT / "params.yaml")
    paper = raw["paper"]
    paper.update(dir=str(root), device="cpu", dtype="float32", limit=4, tasks=list(TASKS), benchmarks=dict(TASKS),
                 methods=["zoo", "divprune", "sparsevlm"], seeds=[1])
    paper["task_notes"] = {k: v for k, v in paper["task_notes"].items() if k in TASKS}
    paper["models"] = {
        "llava-1.5-7b": {"pretrained": str(root / "standins" / "llava-1.5-7b"), "architecture": "LlavaForConditionalGeneration",
                         "budgets": [192, 64]},
        "llava-1.5-13b": {"pretrained": "llava-hf/llava-1.5-13b-hf", "architecture": "LlavaForConditionalGeneration",
                          "budgets": [64], "methods": ["zoo", "divprune"]},
        "llava-next-7b": {"pretrained": str(root / "standins" / "llava-next-7b"),
                          "architecture": "LlavaNextForConditionalGeneration", "budgets": [160], "methods": ["zoo", "divprune"]},
        "qwen2.5-vl-7b": {"pretrained": str(root / "standins" / "qwen2.5-vl-7b"),
                          "architecture": "Qwen2_5_VLForConditionalGeneration", "budgets": [0.2], "methods": ["zoo", "divprune"]},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    from pipeline.plan import write

    write(path)
    return path


def lmms_results(task: str, value) -> dict:
    values = value if isinstance(value, tuple) else (value,)
    return {"alias": task, **{f"{m},none": v for m, v in zip(METRICS[task], values)},
            **{f"{m}_stderr,none": "N/A" for m in METRICS[task]}}


def write_entry(folder: Path, method: str, seed: int = 0, gqa=None) -> dict:
    """One evaluate entry (scores.json, results.json, run.json, samples.csv) of ``method``'s answers."""
    gqa = GQA[method] if gqa is None else gqa
    mmbench, mme, pope = OTHER[method]
    values = {"gqa": sum(gqa) / len(gqa), "mmbench_en_dev_static": mmbench, "mme": mme, "pope": pope}
    folder.mkdir(parents=True)
    results = {"results": {t: lmms_results(t, v) for t, v in values.items()}}
    (folder / "results.json").write_text(json.dumps(results))
    scores = {t: float(sum(v)) if isinstance(v, tuple) else float(v) for t, v in values.items()}
    (folder / "scores.json").write_text(json.dumps(scores))
    (folder / "run.json").write_text(json.dumps({"method": method, "seed": seed, "questions": {"gqa": len(gqa)}}))
    with open(folder / "samples.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "doc_id", "question", "target", "prediction", "correct", "metric"])
        for i, right in enumerate(gqa):
            writer.writerow(["gqa", i, f"question {i}?", "red", "red" if right else "blue", bool(right), "accuracy"])
    return scores


def standin(folder: Path, architecture: str) -> None:
    """A checkpoint folder that says it is a random-weight stand-in (zoo_prune.rehearsal's README)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    (folder / "README.md").write_text("# RANDOM WEIGHTS: a stand-in of the paper's checkpoint\n")


def make_paper_outputs(root: Path, standins: bool = True) -> Path:
    """``root/outputs`` of a paper-profile run by hand; returns the params file. llava-1.5-7b: every entry but
    divprune-192 (missing), zoo-64 also at seed 1; llava-1.5-13b skipped (absent checkpoint); llava-next-7b:
    Table 5's variants at 160; qwen2.5-vl-7b at 20%."""
    params = paper_params(root)
    evaluate = root / "outputs" / "evaluate"
    plan = yaml.safe_load((root / "plan.yaml").read_text())
    for group in ("evaluate_unpruned", "evaluate_zoo", "evaluate_baseline", "evaluate_seeds"):
        for item in plan[group].values():
            model, run, method = item["model"], item["run"], item["method"]
            folder = evaluate / model / run
            if model == "llava-1.5-13b":
                folder.mkdir(parents=True)
                (folder / "skipped.json").write_text(json.dumps({"stage": f"evaluate/{model}/{run}", "model": model,
                                                                 "available": False, "reason": SKIP_REASON}))
            elif run == "divprune-192" or method not in GQA:
                continue
            elif "seed" in item:
                write_entry(folder, method, item["seed"], gqa=[1, 1, 1, 1])
            else:
                write_entry(folder, method)
    for model, spec in yaml.safe_load(params.read_text())["paper"]["models"].items():
        record = {"model": model, "pretrained": spec["pretrained"], "architecture": spec["architecture"],
                  "budgets": spec["budgets"], "estimator": None, "available": model != "llava-1.5-13b",
                  "path": spec["pretrained"] if model != "llava-1.5-13b" else None, "revision": "local:0",
                  "reason": SKIP_REASON if model == "llava-1.5-13b" else None}
        if model != "llava-1.5-13b":
            if standins:
                standin(Path(spec["pretrained"]), spec["architecture"])
            else:
                Path(spec["pretrained"]).mkdir(parents=True, exist_ok=True)
        (root / "outputs" / "checkpoints" / model).mkdir(parents=True, exist_ok=True)
        (root / "outputs" / "checkpoints" / model / "checkpoint.json").write_text(json.dumps(record))
    return params


def tables_of(root: Path, params: Path) -> None:
    """The paper profile's results and ablation stages on ``root/outputs/evaluate`` (W&B off)."""
    import os

    from pipeline import ablation, results

    mode = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "disabled"
    try:
        for module, name in ((results, "results"), (ablation, "ablation")):
            module.main(["--params", str(params), "--runs", str(root / "outputs" / "evaluate"),
                         "--out", str(root / "outputs" / name)])
    finally:
        os.environ.pop("WANDB_MODE") if mode is None else os.environ.__setitem__("WANDB_MODE", mode)


def fake_stage_outputs(outputs: Path, proxy: bool = False) -> None:
    """What the other stages write, by kind (run the results stage first: its figure is reused): sensitivity of
    llava-1.5-7b (a CSV, a figure), llava-1.5-13b skipped; proxy (a CSV, a figure) when ``proxy``; no sweeps."""
    figure = outputs / "results" / "figures" / "avg_vs_budget.png"
    sensitivity = outputs / "sensitivity" / "llava-1.5-7b"
    (sensitivity / "figures").mkdir(parents=True)
    (sensitivity / "agreement.csv").write_text("estimator,naive,fused\nnaive,1.0,0.5\nfused,0.5,1.0\n")
    shutil.copy(figure, sensitivity / "figures" / "overlays.png")
    (outputs / "sensitivity" / "llava-1.5-13b").mkdir()
    (outputs / "sensitivity" / "llava-1.5-13b" / "skipped.json").write_text(json.dumps({"reason": SKIP_REASON}))
    if proxy:
        (outputs / "proxy" / "figures").mkdir(parents=True)
        (outputs / "proxy" / "summary.csv").write_text("task,mean rho,images\nmmmu,0.5,2\npope,0.4,2\n")
        shutil.copy(figure, outputs / "proxy" / "figures" / "proxy_kde.png")
