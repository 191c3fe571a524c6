"""Stage ``evaluate``: one method at one budget (or the unpruned model) through lmms-eval.

    python -m pipeline.evaluate --method zoo --keep 48 --out outputs/evaluate/zoo-48
    python -m pipeline.evaluate --method unpruned --out outputs/evaluate/unpruned
    python -m pipeline.evaluate --params paper/params.yaml --paper-model llava-1.5-7b --method zoo --keep 64 \
        --out paper/outputs/evaluate/llava-1.5-7b/zoo-64                # one entry of the paper profile
    python -m pipeline.evaluate --params paper/params.yaml --dry-run  # print every lmms-eval command of the paper

Runs ``zoo_prune.evaluation.run_lmms_eval`` (model ``zoo_prune``, answers resumable from
``outputs/lmms_cache``) and writes ``--out``: ``results.json`` (lmms-eval's), ``scores.json``
({task: primary metric}), ``samples.csv`` (per question: task, doc_id, question, target, prediction,
correct, metric; the results stage's paired statistics read it), ``run.json`` (method, keep, seed,
options, questions per task) and ``lmms_eval/`` (its samples and log); ``--metrics``: the scores.
``--seed S`` overrides the method's seed (``zoo.seed`` / ``baselines.seed``): run ``<method>-<keep>-seed<S>``.
W&B: config keys ``method``, ``keep``, ``seed``; summary ``score/<task>``, ``score/mean``; a table of
``wandb.samples`` questions per task (image with the kept tokens, question, answer, prediction, correct).
Profile ``paper`` (paper/dvc.yaml, one entry per model x method x budget of paper/plan.yaml): the model
``--paper-model`` of ``paper.models`` at one of its own budgets, on ``paper.tasks`` (``paper.limit``
documents each), ``paper.device`` and ``paper.dtype``, ``paper.num_processes`` GPUs; answers resumable from
``<paper.dir>/cache/lmms``. An absent checkpoint writes ``skipped.json`` instead (pipeline._paper).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from analysis import stats

from ._common import StageError, load_params, parser, stage, write_json

UNPRUNED = stats.UNPRUNED


def method_options(method: str, params: dict) -> dict:
    """The method's options from the params section its registry entry names (``params_section``)."""
    from zoo_prune import method_class

    if method == UNPRUNED:
        return {}
    cls = method_class(method)
    if cls.params_section is None:
        return {}
    return {k: v for k, v in params[cls.params_section].items() if k in cls.options()}


def model_options(method: str, params: dict, model: str) -> dict:
    """``method``'s options on paper model ``model``: its params section's, with the model's own ``estimator``
    (``paper.models.<model>.estimator``: the paper's LLaVA-NeXT uses lowrank) for a method that has one."""
    from zoo_prune import method_class

    options = method_options(method, params)
    spec = params["paper"]["models"][model]
    if method != UNPRUNED and "estimator" in method_class(method).options() and spec.get("estimator"):
        options["estimator"] = spec["estimator"]
    return options


def sections_for(method: str, paper: bool) -> list[str]:
    from zoo_prune import method_class

    section = None if method == UNPRUNED else method_class(method).params_section
    return ["evaluate", "budgets"] + (["paper"] if paper else []) + ([section] if section else [])


def runs(method: str, keep, params: dict, profile: str, model: str, out) -> list[dict]:
    """The lmms-eval run (model args, tasks, output folder, launcher) of one pipeline run: ``model`` is the
    testbed model's folder, or under the paper profile a model of ``paper.models`` (keep: one of its budgets)."""
    base = {"method": "none"} if method == UNPRUNED else {"method": method, "keep": keep, **method_options(method, params)}
    if profile == "testbed":
        evaluate = params["evaluate"]
        return [{"model_args": {"pretrained": model, "device_map": "cpu", **base}, "tasks": evaluate["tasks"],
                 "output_dir": f"{out}/lmms_eval", "limit": evaluate["limit"], "device": "cpu",
                 "batch_size": evaluate["batch_size"]}]
    paper = params["paper"]
    spec = paper["models"][model]
    if method != UNPRUNED:
        base.update(model_options(method, params, model))
    if spec["architecture"].startswith("Llava"):  # lmms-eval's llava_hf takes a dtype; its qwen2_5_vl picks its own
        base["dtype"] = paper["dtype"]
    return [{"model_args": {"pretrained": spec["pretrained"], **base}, "tasks": paper["tasks"],
             "output_dir": f"{out}/lmms_eval", "limit": paper["limit"], "device": paper["device"],
             "num_processes": paper["num_processes"], "include_path": paper["include_path"],
             "batch_size": paper["batch_size"], "use_cache": str(Path(paper["dir"]) / "cache" / "lmms")}]


def with_seed(params: dict, seed: int | None, method: str) -> dict:
    """``params`` with ``seed`` as ``method``'s seed in the section its registry entry names
    (``zoo.seed``, ``baselines.seed``); unchanged when None."""
    from zoo_prune import method_class

    if seed is None:
        return params
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise StageError(f"--seed {seed!r} must be an int >= 0")
    if method == UNPRUNED or not method_class(method).stochastic() or method_class(method).params_section is None:
        raise StageError(f"--seed {seed}: method {method!r} takes no seed from params")
    section = method_class(method).params_section
    return {**params, section: {**params[section], "seed": seed}}


def run_info(method: str, keep, params: dict, samples: pd.DataFrame) -> dict:
    """What the run was (method, keep, the seed it used or None, its options) and on how many questions per task."""
    options = {} if method == UNPRUNED else method_options(method, params)
    return {"method": method, "keep": keep, "seed": options.get("seed"), "options": options,
            "questions": {t: int(n) for t, n in samples.groupby("task").size().items()}}


def log_to_wandb(s, info: dict, scores: dict, samples: pd.DataFrame, args) -> None:
    """W&B: ``method``, ``keep``, ``seed`` as config (a dashboard groups by them), scores under ``score/``,
    and for the testbed a table of ``wandb.samples`` questions per task with the kept tokens drawn."""
    run = s.tracker.run
    if run is None:
        return
    import wandb

    run.config.update({"method": info["method"], "keep": info["keep"], "seed": info["seed"]}, allow_val_change=True)
    run.summary.update({f"score/{t}": v for t, v in scores.items()} | {"score/mean": sum(scores.values()) / len(scores)}
                       | {f"questions/{t}": n for t, n in info["questions"].items()})
    per_task = load_params(args.params).get("wandb", {}).get("samples", 0)
    if s.profile != "testbed" or not per_task or samples.empty:
        return
    table = wandb.Table(columns=["task", "doc_id", "image", "question", "answer", "prediction", "correct", "kept"])
    for row in sample_rows(args.model, args.data, info, samples, per_task):
        table.add_data(row["task"], row["doc_id"], wandb.Image(row["view"], caption=row["caption"]), row["question"],
                       row["target"], row["prediction"], row["correct"], row["kept"])
    run.log({"table/samples": table})


def sample_rows(model_dir, data_dir, info: dict, samples: pd.DataFrame, per_task: int) -> list[dict]:
    """The first ``per_task`` questions of each testbed task with the image, pruned tokens dimmed: the kept
    tokens recomputed with ``zoo_prune.apply_pruning`` (``handle.kept_indices``) on the testbed model."""
    import torch

    from zoo_prune import apply_pruning, method_class
    from zoo_prune.demo import highlight, token_views
    from zoo_prune.tiny import chat_prompt

    from ._common import load_model, load_rows

    model, processor = load_model(model_dir)
    rows = []
    for task, group in samples.groupby("task", sort=True):
        chosen = group.nsmallest(per_task, "doc_id")
        questions = load_rows(data_dir, task.removeprefix("testbed_"), int(chosen["doc_id"].max()) + 1)
        for sample in chosen.itertuples():
            question = questions[int(sample.doc_id)]
            inputs = processor(images=question["image"], text=chat_prompt(processor, question["question"]), return_tensors="pt")
            kept, kind = None, "projector"
            if info["method"] != UNPRUNED:
                kind = method_class(info["method"]).kind
                with torch.no_grad(), apply_pruning(model, info["method"], keep=info["keep"], **info["options"]) as handle:
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
                    kept = handle.kept_indices[0]
            [(_, view, mask)] = token_views(model, processor, question["image"], inputs, kept, kind)
            shown = int(mask.sum()) if mask is not None else None
            caption = ("all tokens" if kept is None else f"{shown} tokens kept (pruned dimmed)" if shown is not None
                       else "kept tokens not drawable (pruned inside the language model)")
            view = highlight(view, mask).repeat(3, axis=0).repeat(3, axis=1)  # 3x: the testbed's 96 px images are small
            rows.append({"task": task, "doc_id": int(sample.doc_id), "view": view, "question": sample.question,
                         "target": sample.target, "prediction": sample.prediction, "correct": bool(sample.correct),
                         "kept": shown, "caption": caption})
    return rows


def check_run(method: str, keep, params: dict, model: str | None = None) -> None:
    """A known method at one of the budgets (the testbed's, or ``model``'s own under the paper profile)."""
    from zoo_prune import available_methods

    if method != UNPRUNED and method not in available_methods():
        raise StageError(f"unknown method {method!r}; choose {UNPRUNED!r} or one of {available_methods()}")
    budgets = params["budgets"] if model is None else params["paper"]["models"][model]["budgets"]
    if method != UNPRUNED and keep not in budgets:
        where = "params budgets" if model is None else f"params paper.models.{model}.budgets"
        raise StageError(f"--keep {keep} is not one of {where} {budgets}")


def main(argv=None) -> None:
    from zoo_prune.demo import parse_keep

    from ._common import profile_of

    p = parser(__doc__, inputs=("model",))
    p.add_argument("--method", help=f"{UNPRUNED!r} or a zoo_prune method (all of them with --dry-run when omitted)")
    p.add_argument("--keep", type=parse_keep, help="visual tokens kept (one of the budgets; a ratio like 0.2 for Qwen2.5-VL)")
    p.add_argument("--paper-model", help="paper profile: the model of params paper.models this entry runs")
    p.add_argument("--out", help="output folder (default outputs/evaluate/<method>-<keep>)")
    p.add_argument("--metrics", help="metrics JSON (testbed default outputs/metrics/evaluate/<method>-<keep>.json)")
    p.add_argument("--seed", type=int, help="the method's seed instead of params zoo.seed / baselines.seed")
    p.add_argument("--data", default="data/testbed", help="testbed data (images of the W&B per-sample table)")
    p.add_argument("--dry-run", action="store_true", help="print the lmms-eval commands; run and write nothing")
    args = p.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not args.method:
        p.error("--method is required (except with --dry-run)")
    paper = profile_of(args.params) == "paper"
    if paper and not (args.paper_model and args.out):
        p.error("the paper profile needs --paper-model and --out (paper/dvc.yaml passes them)")
    name = stats.run_name(args.method, args.keep, args.seed)
    args.out = args.out or f"outputs/evaluate/{name}"
    args.metrics = args.metrics or (None if paper else f"outputs/metrics/evaluate/{name}.json")
    label = f"evaluate/{args.paper_model}/{name}" if paper else f"evaluate/{name}"
    with stage(label, args, sections_for(args.method, paper), ["out"] + (["metrics"] if args.metrics else [])) as s:
        from zoo_prune.evaluation import run_lmms_eval

        from . import _paper

        model = args.model
        if paper:
            model = args.paper_model
            _paper.spec(s.params, model)
            record = _paper.availability(s.params, model)
            if not record["available"]:
                return _paper.skip(s.out["out"], record, label)
        check_run(args.method, args.keep, s.params, args.paper_model if paper else None)
        params = with_seed(s.params, args.seed, args.method)
        [run] = runs(args.method, args.keep, params, s.profile, model, s.out["out"])
        results = run_lmms_eval(**run)
        scores = stats.task_scores(results)
        shutil.copy(results["results_path"], s.out["out"] / "results.json")
        samples = stats.lmms_samples(run["output_dir"], results)
        write_json(s.out["out"] / "scores.json", scores)
        if args.metrics:
            write_json(s.out["metrics"], scores)
        samples.to_csv(s.out["out"] / "samples.csv", index=False)
        info = run_info(args.method, args.keep, params, samples) | ({"model": model, **{k: record[k] for k in (
            "pretrained", "revision")}} if paper else {})
        write_json(s.out["out"] / "run.json", info)
        s.log(metrics=scores)
        log_to_wandb(s, info, scores, samples, args)


def dry_run(args) -> None:
    """Print every lmms-eval command the params' profile would run (all methods and budgets unless --method):
    the testbed's, or every entry of the paper profile's plan."""
    from zoo_prune import available_methods
    from zoo_prune.evaluation import run_lmms_eval

    from ._common import load_params

    params = load_params(args.params)
    if params["profile"] == "paper":
        from .plan import build

        plan = build(params)
        for group in ("evaluate_unpruned", "evaluate_zoo", "evaluate_baseline", "evaluate_seeds"):
            for item in plan[group].values():
                if (args.method and item["method"] != args.method) or (args.paper_model and item["model"] != args.paper_model):
                    continue
                out = Path(params["paper"]["dir"]) / "outputs" / "evaluate" / item["model"] / item["run"]
                run_params = with_seed(params, item.get("seed"), item["method"])
                for run in runs(item["method"], item.get("keep"), run_params, "paper", item["model"], out):
                    run_lmms_eval(**run, dry_run=True)
        return
    methods = [args.method] if args.method else [UNPRUNED, *available_methods()]
    for method in methods:
        for keep in [None] if method == UNPRUNED else ([args.keep] if args.keep else params["budgets"]):
            check_run(method, keep, params)
            out = args.out or f"outputs/evaluate/{UNPRUNED if keep is None else f'{method}-{keep}'}"
            for run in runs(method, keep, params, "testbed", args.model, out):
                run_lmms_eval(**run, dry_run=True)


if __name__ == "__main__":
    try:
        main()
    except StageError as error:
        raise SystemExit(f"error: {error}") from error
