"""Stages ``sweep_h`` and ``sweep_m`` (paper Fig. 4): ZOO-Prune on one task at one budget while h (or m)
varies, through lmms-eval; the m sweep adds the closed-form estimator as the m -> infinity line.

    python -m pipeline.sweep --over h                                   # testbed: outputs/sweep_h ...
    python -m pipeline.sweep --over h --params paper/params.yaml --out paper/outputs/sweep_h   # the paper profile

Every point of one sweep runs in ONE lmms-eval process (``zoo_prune.evaluation.run_lmms_eval_series``:
lmms-eval's ``--config`` with one run per value, each in ``<out>/<h|m>=<value>/``, the closed form in
``<out>/closed_form/``), so the imports and the task index are paid once; answers are resumable from the
profile's cache. Testbed: ``sweep.task`` at ``sweep.keep`` on the testbed model (CPU), outputs ``--out``,
``--metrics``, ``--figures``. Paper profile: ``paper.sweep.model`` (its lmms-eval run as the evaluate stage
builds it: ``paper.device``, ``paper.dtype``, ``paper.num_processes``, ``paper.include_path``,
``paper.batch_size``, the resume cache ``<paper.dir>/cache/lmms``) on ``paper.sweep.task`` at
``paper.sweep.keep``, ``paper.sweep.limit`` documents; everything inside ``--out``: ``sweep.csv``,
``metrics.json``, ``figures/sweep_<h|m>.png``; an absent checkpoint writes ``skipped.json`` instead.
The swept values are the base params' ``sweep.h`` / ``sweep.m``; the other zoo options are ``zoo``'s.
"""

from __future__ import annotations

import pandas as pd

from analysis import figures, stats

from ._common import load_params, parser, stage, weights_note, write_json
from .inputs import check_data

TESTBED_DATA = "data/testbed"  # where the testbed task YAMLs read it, relative to the working directory

FIXED = {"h": "m", "m": "h"}  # the zoo parameter held at its params value while the other varies
CLOSED_FORM = "closed_form"  # the m -> infinity reference of the m sweep (h -> 0: deterministic)


def paper_fig4(over: str) -> str:
    """What ``analysis/paper_numbers.csv`` holds of the paper's Fig. 4 (the metrics say it): the paper draws
    the curves and its text gives no value, so nothing is drawn beside ours unless the CSV gains ``fig4`` rows."""
    from analysis.paper import paper_numbers

    numbers = paper_numbers()
    rows = numbers[numbers["table"] == "fig4"]
    if rows.empty:
        return f"paper's Fig. 4 ({over}): no values in analysis/paper_numbers.csv (the paper draws the curve only)"
    return f"paper's Fig. 4 ({over}): " + "; ".join(f"{r.metric} {r.value:g}" for r in rows.itertuples())


def series(s, args, value_options: dict[str, dict], record: dict | None) -> tuple[dict, str, int, str]:
    """Run every point (name -> zoo options) in one lmms-eval process; (results per point, task, keep, the
    weights note). ``record``: the paper model's checkpoint record (None for the testbed)."""
    from zoo_prune.evaluation import run_lmms_eval_series

    out = s.out["out"]
    if s.profile == "testbed":
        cfg = s.params["sweep"]
        check_data(TESTBED_DATA)  # the testbed task YAMLs read it relative to the working directory
        task, keep = cfg["task"], cfg["keep"]
        runs = {name: {"pretrained": args.model, "device_map": "cpu", "method": "zoo", "keep": keep, **options}
                for name, options in value_options.items()}
        shared = {"limit": cfg["limit"], "device": "cpu", "batch_size": cfg["batch_size"]}
        note = weights_note(args.model)
    else:
        from . import _paper
        from .evaluate import runs as evaluate_runs

        cfg = s.params["paper"]["sweep"]
        task, keep, model = cfg["task"], cfg["keep"], cfg["model"]
        note = _paper.weights_note(record)
        runs, shared = {}, None
        for name, options in value_options.items():
            # the model's lmms-eval run as the evaluate stage builds it (dtype, the model's estimator, device, cache)
            point = {**s.params, "zoo": {**s.params["zoo"], **options}}
            [run] = evaluate_runs("zoo", keep, point, "paper", model, out)
            if options.get("estimator") == CLOSED_FORM:
                run["model_args"]["estimator"] = CLOSED_FORM  # the reference line, whatever the model's estimator
            runs[name] = run.pop("model_args")
            shared = {k: v for k, v in run.items() if k not in ("tasks", "output_dir", "limit")}
            shared["limit"] = cfg["limit"]
    results = run_lmms_eval_series(runs, [task], out, **shared)
    return results, task, keep, note


def main(argv=None) -> None:
    p = parser(__doc__, inputs=("model",))
    p.add_argument("--over", choices=tuple(FIXED), required=True)
    p.add_argument("--out")
    p.add_argument("--metrics", help="testbed only (the paper profile writes <out>/metrics.json)")
    p.add_argument("--figures", help="testbed only (the paper profile writes <out>/figures)")
    args = p.parse_args(argv)
    name = f"sweep_{args.over}"
    paper = load_params(args.params, ["profile"])["profile"] == "paper"
    if paper and not args.out:
        p.error("the paper profile needs --out (paper/dvc.yaml passes it)")
    if paper and (args.metrics or args.figures):
        p.error("the paper profile writes metrics.json and figures/ inside --out")
    args.out = args.out or f"outputs/{name}"
    outputs = ["out"]
    if not paper:
        args.metrics = args.metrics or f"outputs/metrics/{name}.json"
        args.figures = args.figures or f"outputs/figures/{name}"
        outputs += ["metrics", "figures"]
    with stage(name, args, ["sweep", "zoo"] + (["paper"] if paper else []), outputs) as s:
        zoo, grid = s.params["zoo"], s.params["sweep"][args.over]
        record = None
        if paper:
            from . import _paper

            record = _paper.availability(s.params, s.params["paper"]["sweep"]["model"])
            if not record["available"]:
                return _paper.skip(s.out["out"], record, name)
        fixed = {FIXED[args.over]: zoo[FIXED[args.over]], "seed": zoo["seed"], "estimator": zoo["estimator"]}
        points = {f"{args.over}={value}": {**fixed, args.over: value} for value in grid}
        if args.over == "m":  # h -> 0, m -> infinity: the deterministic closed form
            points[CLOSED_FORM] = {"seed": zoo["seed"], "estimator": CLOSED_FORM}
        results, task, keep, note = series(s, args, points, record)
        scores = {point: stats.task_scores(result)[task] for point, result in results.items()}
        questions = int(next(iter(results.values()))["n-samples"][task]["effective"])
        data = pd.DataFrame({args.over: grid, "score": [scores[f"{args.over}={v}"] for v in grid]})
        data["questions"] = questions
        reference = scores.get(CLOSED_FORM)
        fig4 = paper_fig4(args.over) if paper else ""
        if note:
            data["note"] = note  # the table says it too, not only the figure
        out = s.out["out"]
        data.to_csv(out / "sweep.csv", index=False)
        figure_dir = out / "figures" if paper else s.out["figures"]
        label = f"{task} score at {keep} tokens"  # lmms-eval's primary metric (POPE: F1)
        if not paper:
            label = f"{task} {'F1' if 'existence' in task else 'accuracy'} at {keep} tokens"
        drawn = figures.sweep(data, args.over, label, reference, "closed form (m -> inf)", note,
                              questions=f"{questions} test questions per point")
        figure = figures.save(drawn, figure_dir / f"{name}.png")
        metrics = {f"score/{args.over}={v}": float(x) for v, x in zip(data[args.over], data["score"])}
        if reference is not None:
            metrics["score/closed_form"] = float(reference)
        if paper:
            metrics |= {"task": task, "keep": keep, "questions": questions, "model": record["model"],
                        "revision": record["revision"], "paper_fig4": fig4, "note": note}
        write_json(out / "metrics.json" if paper else s.out["metrics"], metrics)
        s.log(metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))}, tables={name: data},
              images={name: figure})


if __name__ == "__main__":
    main()
