"""Stage ``evaluate``: one method at one budget (or the unpruned model) through lmms-eval.

    python -m pipeline.evaluate --method zoo --keep 48 --out outputs/evaluate/zoo-48
    python -m pipeline.evaluate --method unpruned --out outputs/evaluate/unpruned
    python -m pipeline.evaluate --profile paper --dry-run        # print every lmms-eval command of the paper

Runs ``zoo_prune.evaluation.run_lmms_eval`` (model ``zoo_prune``, answers resumable from
``outputs/lmms_cache``) and writes ``--out``: ``results.json`` (lmms-eval's), ``scores.json``
({task: primary metric}) and ``lmms_eval/`` (its samples and log); ``--metrics``: the scores.
Profile ``paper``: every model of ``paper.models`` at its own budget of the same level
(``budgets[i]`` -> ``paper.models.<model>.budgets[i]``), the paper's tasks, ``paper.device``.
"""

from __future__ import annotations

import json
import shutil

from analysis import stats

from ._common import StageError, need, parser, stage, write_json

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


def sections_for(method: str) -> list[str]:
    from zoo_prune import method_class

    section = None if method == UNPRUNED else method_class(method).params_section
    return ["evaluate", "budgets", "paper"] + ([section] if section else [])


def supports(pretrained: str, method: str) -> bool:
    """Whether the checkpoint's family runs ``method``'s kind (its adapter's ``supports``); True when its
    config is not on this machine (the run itself then names the problem)."""
    from transformers import AutoConfig

    from zoo_prune import method_class
    from zoo_prune.adapters import adapter_class

    try:
        config = AutoConfig.from_pretrained(pretrained, local_files_only=True)
    except (OSError, ValueError):
        return True
    adapter = adapter_class(config.architectures[0] if config.architectures else "")
    return adapter is None or method_class(method).kind in adapter.supports


def runs(method: str, keep: int | None, params: dict, profile: str, model: str, out) -> list[dict]:
    """The lmms-eval runs (model args, tasks, output folder, launcher) of one pipeline run."""
    from zoo_prune import method_class

    evaluate = params["evaluate"]
    base = {"method": "none"} if method == UNPRUNED else {"method": method, "keep": keep, **method_options(method, params)}
    if profile == "testbed":
        return [{"model_args": {"pretrained": model, "device_map": "cpu", **base}, "tasks": need(evaluate, "evaluate", "tasks", list),
                 "output_dir": f"{out}/lmms_eval", "limit": evaluate.get("limit"), "device": "cpu",
                 "batch_size": evaluate.get("batch_size", 1)}]
    paper = params["paper"]
    level = None if method == UNPRUNED else params["budgets"].index(keep)
    found = []
    for name, spec in paper["models"].items():
        args = dict(base)
        if level is not None:
            if level >= len(spec["budgets"]) or not supports(spec["pretrained"], method):
                continue  # Qwen2.5-VL: two budgets, no vision-stage method (method.md section 3-4)
            args["keep"] = spec["budgets"][level]
            if "estimator" in spec and "estimator" in method_class(method).options():  # the paper's LLaVA-NeXT: lowrank
                args["estimator"] = spec["estimator"]
        found.append({"model_args": {"pretrained": spec["pretrained"], **args}, "tasks": paper["tasks"],
                      "output_dir": f"{out}/{name}", "limit": None, "device": paper["device"],
                      "num_processes": paper.get("num_processes", 1), "include_path": None,
                      "batch_size": paper.get("batch_size", 1)})
    return found


def check_run(method: str, keep, params: dict) -> None:
    from zoo_prune import available_methods

    if method != UNPRUNED and method not in available_methods():
        raise StageError(f"unknown method {method!r}; choose {UNPRUNED!r} or one of {available_methods()}")
    if method != UNPRUNED and keep not in params["budgets"]:
        raise StageError(f"--keep {keep} is not one of params budgets {params['budgets']}")


def main(argv=None) -> None:
    p = parser(__doc__, inputs=("model",))
    p.add_argument("--method", help=f"{UNPRUNED!r} or a zoo_prune method (all of them with --dry-run when omitted)")
    p.add_argument("--keep", type=int, help="visual tokens kept (one of params budgets)")
    p.add_argument("--out", help="output folder (default outputs/evaluate/<method>-<keep>)")
    p.add_argument("--metrics", help="metrics JSON (default outputs/metrics/evaluate/<method>-<keep>.json)")
    p.add_argument("--dry-run", action="store_true", help="print the lmms-eval commands; run and write nothing")
    args = p.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not args.method:
        p.error("--method is required (except with --dry-run)")
    name = UNPRUNED if args.method == UNPRUNED else f"{args.method}-{args.keep}"
    args.out = args.out or f"outputs/evaluate/{name}"
    args.metrics = args.metrics or f"outputs/metrics/evaluate/{name}.json"
    with stage(f"evaluate/{name}", args, sections_for(args.method), ["out", "metrics"], testbed_only=False) as s:
        from zoo_prune.evaluation import run_lmms_eval

        check_run(args.method, args.keep, s.params)
        scores = {}
        for run in runs(args.method, args.keep, s.params, s.profile, args.model, s.out["out"]):
            results = run_lmms_eval(**run)
            prefix = "" if s.profile == "testbed" else run["output_dir"].rsplit("/", 1)[1] + "/"
            scores |= {prefix + task: score for task, score in stats.task_scores(results).items()}
            shutil.copy(results["results_path"], f"{run['output_dir']}/results.json")
        write_json(s.out["out"] / "scores.json", scores)
        write_json(s.out["metrics"], scores)
        s.log(metrics=scores)


def dry_run(args) -> None:
    """Print every lmms-eval command the profile would run (all methods and budgets unless --method)."""
    from zoo_prune import available_methods
    from zoo_prune.evaluation import run_lmms_eval

    from ._common import load_params

    params = load_params(args.params)
    profile = args.profile or params["profile"]
    methods = [args.method] if args.method else [UNPRUNED, *available_methods()]
    for method in methods:
        for keep in [None] if method == UNPRUNED else ([args.keep] if args.keep else params["budgets"]):
            check_run(method, keep, params)
            out = args.out or f"outputs/evaluate/{UNPRUNED if keep is None else f'{method}-{keep}'}"
            for run in runs(method, keep, params, profile, args.model, out):
                run_lmms_eval(**run, dry_run=True)


if __name__ == "__main__":
    try:
        main()
    except StageError as error:
        raise SystemExit(f"error: {error}") from error
