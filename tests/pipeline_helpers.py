"""Shared by the pipeline and notebook tests: a tiny workspace (data, random-weight testbed model,
small params), stage runners, and a reader of offline W&B run files."""

import json
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["testbed_attribute", "testbed_existence", "testbed_counting", "testbed_relation", "testbed_reading"]


def small_params(**overrides) -> dict:
    """The repository's params.yaml with every count cut to a few items; ``overrides``: {"section.key": value}."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["wandb"]["group"] = "pytest"
    params["budgets"] = [48, 16]
    params["sensitivity"].update(samples=3, overlay_samples=1)
    params["proxy"].update(samples=3, directions=2, exact_samples=1)
    params["zoo"]["m"] = 8
    params["evaluate"].update(limit=1, zoo_methods=["zoo", "sum_fusion", "sensitivity_only"], baselines=["divprune"])
    params["efficiency"].update(samples=1, repeats=1, new_tokens=2, layer_tokens=[8])
    for key, value in overrides.items():
        section, name = key.split(".")
        params[section][name] = value
    return params


def make_workspace(root: Path) -> Path:
    """``root`` with data/testbed (8 test questions per task), a random-weight testbed model and params.yaml."""
    from zoo_prune.testbed.dataset import build_splits
    from zoo_prune.testbed.model import TestbedConfig, build_model

    torch.set_num_threads(1)
    build_splits(root / "data" / "testbed", sizes={"train": 0, "validation": 1, "test": 8}, progress=False)
    model, processor = build_model(TestbedConfig(vision_width=32, vision_layers=2, text_width=32, text_layers=2))
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    write_params(root, small_params())
    return root


def write_params(root: Path, params: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_stage(module, root: Path, *args: str, params: str = "params.yaml", **paths) -> None:
    """``module.main`` with the workspace's params, model and data; outputs under ``root/outputs``."""
    argv = ["--params", str(root / params), *args]
    for name, value in paths.items():
        argv += [f"--{name}", str(value)]
    module.main(argv)


def stage_paths(root: Path, stage: str, model: bool = True, data: bool = True) -> dict:
    paths = {"out": root / "outputs" / stage, "metrics": root / "outputs" / "metrics" / f"{stage}.json",
             "figures": root / "outputs" / "figures" / stage}
    if model:
        paths["model"] = root / "model"
    if data:
        paths["data"] = root / "data" / "testbed"
    return paths


def write_runs(folder: Path, runs: dict[str, dict[str, tuple[list[str], list[str]]]]) -> None:
    """Hand-made evaluate runs with per-question answers: ``{"zoo-48": {task: (targets, predictions)}}`` ->
    ``folder/zoo-48/{samples.csv, scores.json, run.json}``; scores by ``zoo_prune.testbed.evaluate.score``
    (what the testbed's lmms-eval tasks report), F1 of "yes" for existence, accuracy otherwise."""
    import csv

    from zoo_prune.testbed.evaluate import score

    for name, tasks in runs.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        with open(folder / name / "samples.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["task", "doc_id", "question", "target", "prediction", "correct", "metric"])
            for task, (targets, predictions) in tasks.items():
                metric = "f1" if task.endswith("existence") else "accuracy"
                for i, (t, p) in enumerate(zip(targets, predictions)):
                    writer.writerow([task, i, f"question {i}?", t, p, t == p, metric])
        scores = {task: score(task.removeprefix("testbed_"), predictions, targets)
                  for task, (targets, predictions) in tasks.items()}
        (folder / name / "scores.json").write_text(json.dumps(scores))
        seed = int(name.rsplit("seed", 1)[1]) if "-seed" in name else 0
        (folder / name / "run.json").write_text(json.dumps({"seed": seed}))


def offline_runs(wandb_dir: Path) -> list[dict]:
    """Every offline W&B run under ``wandb_dir/wandb``: job_type, group, config, summary keys, logged images."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    runs = []
    for folder in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        [log] = folder.glob("run-*.wandb")
        store = DataStore()
        store.open_for_scan(str(log))
        run = {"summary": set(), "images": sorted((folder / "files" / "media" / "images").glob("**/*.png")),
               "config_updates": {}, "tables": {}}
        while (data := store.scan_data()) is not None:
            record = pb.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run |= {"job_type": record.run.job_type, "group": record.run.run_group, "project": record.run.project,
                        "config": {i.key: json.loads(i.value_json) for i in record.run.config.update}}
            elif kind == "summary":
                run["summary"] |= {i.key or "/".join(i.nested_key) for i in record.summary.update}
            elif kind == "config":
                run["config_updates"] |= {i.key: json.loads(i.value_json) for i in record.config.update}
            elif kind == "artifact" and record.artifact.type == "run_table":  # a logged wandb.Table: its files
                run["tables"][record.artifact.name] = [entry.path for entry in record.artifact.manifest.contents]
        runs.append(run)
    return runs


def build_paper_standins(root: Path, docs: int = 6) -> Path:
    """``root/models/<model>`` (the four paper stand-in checkpoints) and ``root/data`` (the nine stand-in tasks)."""
    from zoo_prune.evaluation import PAPER_TASKS
    from zoo_prune.rehearsal import checkpoints, tasks

    torch.set_num_threads(1)
    checkpoints.build_standins(root / "models")
    tasks.build_standins(root / "data", PAPER_TASKS, docs=docs)
    return root


def paper_params(folder: Path, standins: Path, models=None, **paper) -> Path:
    """A paper-profile folder ``folder`` (params.yaml + plan.yaml, outputs under it) on the stand-ins of ``standins``
    (:func:`build_paper_standins`): the rehearsal's settings (rehearsal/overrides.yaml) with absolute paths,
    ``models`` (default all four) and ``paper`` keys set; its base is the repository's params.yaml."""
    from pipeline import plan
    from pipeline.schema import load_yaml, merge

    over = load_yaml(ROOT / "rehearsal" / "overrides.yaml")
    base = load_yaml(ROOT / "paper" / "params.yaml")
    section = merge(base["paper"], over["paper"])
    for name, spec in section["models"].items():
        spec["pretrained"] = str(standins / "models" / name)
    section["models"] = {n: s for n, s in section["models"].items() if models is None or n in models}
    first = next(iter(section["models"]))
    for key in ("ablation", "proxy", "sweep", "efficiency"):  # stages of a model left out run on the first one
        if section[key]["model"] not in section["models"]:
            section[key]["model"] = first
    section["sweep"]["keep"] = section["models"][section["sweep"]["model"]]["budgets"][0]
    section = merge(section, {"dir": str(folder), "include_path": str(standins / "data" / "tasks"), **paper})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"base": str(ROOT / "params.yaml"), "profile": "paper",
                                    "wandb": {"group": "pytest"}, "paper": section}, sort_keys=False))
    plan.write(path)
    return path
