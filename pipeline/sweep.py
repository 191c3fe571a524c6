"""Stages ``sweep_h`` and ``sweep_m`` (paper Fig. 4): ZOO-Prune on one task at one budget while h (or m)
varies, through lmms-eval; the m sweep adds the closed-form estimator as the m -> infinity line.

    python -m pipeline.sweep --over h --out outputs/sweep_h ...
"""

from __future__ import annotations

import pandas as pd

from analysis import figures, stats

from ._common import parser, stage, weights_note, write_json
from .inputs import check_data

TESTBED_DATA = "data/testbed"  # where the testbed task YAMLs read it, relative to the working directory

FIXED = {"h": "m", "m": "h"}  # the zoo parameter held at its params value while the other varies


def score(model: str, task: str, limit, output_dir, batch_size: int = 1, **options) -> float:
    """The task's primary score of ZOO-Prune with ``options`` (one lmms-eval run)."""
    from zoo_prune.evaluation import run_lmms_eval

    results = run_lmms_eval({"pretrained": model, "device_map": "cpu", "method": "zoo", **options}, [task],
                            str(output_dir), limit=limit, device="cpu", batch_size=batch_size)
    return stats.task_scores(results)[task]


def questions_of(out, task: str) -> int:
    """Questions each sweep point was scored on (lmms-eval's ``n-samples`` of its first run)."""
    import json

    path = next(iter(sorted(out.glob("*/**/*_results.json"))))
    return int(json.loads(path.read_text())["n-samples"][task]["effective"])


def main(argv=None) -> None:
    p = parser(__doc__, inputs=("model",))
    p.add_argument("--over", choices=tuple(FIXED), required=True)
    p.add_argument("--out")
    p.add_argument("--metrics")
    p.add_argument("--figures")
    args = p.parse_args(argv)
    name = f"sweep_{args.over}"
    args.out = args.out or f"outputs/{name}"
    args.metrics = args.metrics or f"outputs/metrics/{name}.json"
    args.figures = args.figures or f"outputs/figures/{name}"
    with stage(name, args, ["sweep", "zoo"], ["out", "metrics", "figures"]) as s:
        cfg, zoo = s.params["sweep"], s.params["zoo"]
        check_data(TESTBED_DATA)  # the testbed task YAMLs read it relative to the working directory
        task, keep, limit, grid = cfg["task"], cfg["keep"], cfg["limit"], cfg[args.over]
        fixed = {FIXED[args.over]: zoo[FIXED[args.over]], "seed": zoo["seed"], "estimator": zoo["estimator"], "keep": keep,
                 "batch_size": cfg["batch_size"]}
        out = s.out["out"]
        rows = [{args.over: value, "score": score(args.model, task, limit, out / f"{args.over}={value}",
                                                  **fixed, **{args.over: value})} for value in grid]
        data = pd.DataFrame(rows)
        questions = questions_of(out, task)
        data["questions"] = questions
        reference = None
        if args.over == "m":  # h -> 0, m -> infinity: the deterministic closed form
            reference = score(args.model, task, limit, out / "closed_form", keep=keep, seed=zoo["seed"],
                              estimator="closed_form", batch_size=cfg.get("batch_size", 1))
        data.to_csv(out / "sweep.csv", index=False)
        metric = "F1" if "existence" in task else "accuracy"
        figure = figures.save(figures.sweep(data, args.over, f"{task} {metric} at {keep} tokens", reference,
                                            "closed form (m -> inf)", weights_note(args.model),
                                            questions=f"{questions} test questions per point"),
                              s.out["figures"] / f"{name}.png")
        metrics = {f"score/{args.over}={v}": float(x) for v, x in zip(data[args.over], data["score"])}
        if reference is not None:
            metrics["score/closed_form"] = float(reference)
        write_json(s.out["metrics"], metrics)
        s.log(metrics=metrics, tables={name: data}, images={name: figure})


if __name__ == "__main__":
    main()
