"""Stage ``ablation``: Table 5 (sensitivity only, diversity only = DivPrune, sum, multiply = ZOO-Prune)
at every budget, from the evaluate runs, with paired-bootstrap intervals (``results`` params) and the
bars of Avg from 0 with their intervals.

Profile ``paper`` (paper/dvc.yaml): Table 5, ``ablation.variants`` on ``paper.ablation.model`` at its budgets
in the form of ``results``' paper tables (the paper's Table 5 numbers beside every cell, the difference,
paired statistics), everything inside ``--out`` (``<model>/``, ``summary.md``, ``metrics.json``)."""

from __future__ import annotations

from analysis import figures, stats

from ._common import StageError, parser, profile_of, stage, weights_note, write_json
from .results import (bootstrap_runs, checkpoint_records, expected_runs, interval_table, model_tables, paper_parser,
                      readable_table, summary_lines, tokens_per_image)

# method -> (sensitivity, diversity, fusion), the columns of the paper's Table 5
VARIANTS = {"sensitivity_only": ("yes", "no", "none"), "divprune": ("no", "yes", "none"),
            "sum_fusion": ("yes", "yes", "sum"), "zoo": ("yes", "yes", "multiply")}
FLAGS = ("Sensitivity", "Diversity", "Fusion")


def check_variants(variants: list[str]) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise StageError(f"params ablation.variants has {unknown}; choose from {list(VARIANTS)}")


def paper_main(argv) -> None:
    """Table 5 (``--params`` of the paper profile): ``ablation.variants`` on ``paper.ablation.model`` at its budgets,
    the paper's numbers beside; everything inside ``--out`` (``<model>/...``, summary.md, metrics.json)."""
    from pathlib import Path

    from analysis import paper

    from . import _paper

    args = paper_parser("ablation").parse_args(argv)
    with stage("ablation", args, ["paper", "ablation", "results"], ["out"]) as s:
        model = s.params["paper"]["ablation"]["model"]
        _paper.spec(s.params, model)
        variants = s.params["ablation"]["variants"]
        check_variants(variants)
        res = s.params["results"]
        numbers = paper.paper_numbers()
        runs = Path(args.runs)
        note = _paper.weights_note(checkpoint_records(s.params, runs.parent / "checkpoints")[model])
        out = s.out["out"]
        out.mkdir(parents=True)
        summary = model_tables(s, model, runs, out, variants, paper.ABLATION_TABLE, numbers, note, flags=VARIANTS,
                               reference=res["reference"], pair=res["mcnemar"])
        lines = ([f"**{note}**", ""] if note else []) + summary_lines([summary], "Table 5: the selection score's ablation")
        (out / "summary.md").write_text("\n".join(lines))
        metrics = dict(summary.get("metrics", {})) | {f"status/{model}": summary["status"], "rehearsal": bool(note)}
        if summary.get("reason"):
            metrics[f"reason/{model}"] = summary["reason"]
        missing = [*summary["missing"], *summary["failed"], *summary["skipped"]]
        if summary["status"] == "ran" and missing:
            metrics[f"missing/{model}"] = missing
        write_json(out / "metrics.json", metrics)
        s.log(metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
              images={p.stem: p for p in sorted(out.glob("**/figures/*.png"))})


def main(argv=None) -> None:
    p = parser(__doc__, "ablation", inputs=("runs", "model"))
    args = p.parse_args(argv)
    if profile_of(args.params) == "paper":  # paper/dvc.yaml's command: --params, --runs, --out
        return paper_main(argv)
    with stage("ablation", args, ["ablation", "budgets", "results"], ["out", "metrics", "figures"]) as s:
        variants = s.params["ablation"]["variants"]
        check_variants(variants)
        res = s.params["results"]
        options = {key: res[key] for key in ("confidence", "resamples", "seed")}
        expected = expected_runs(s.params, variants)
        runs = stats.read_runs(args.runs, expected)
        samples = stats.read_samples(args.runs, [stats.run_name(m, k) for m, k in expected])
        metrics_of = dict(samples.drop_duplicates("task").sort_values("task")[["task", "metric"]].values)
        tokens = tokens_per_image(args.model)
        boot = bootstrap_runs(samples, variants, s.params["budgets"], None, options)
        table = interval_table(stats.paper_table(runs, tokens, variants), boot, metrics_of, tokens)
        table = table.drop(index=stats.UNPRUNED, level="method")
        flags = table.index.get_level_values("method").map(VARIANTS)
        for i, column in enumerate(FLAGS):
            table.insert(i, column, [f[i] for f in flags])
        table = table.rename_axis(index={"method": "variant"})
        per_task = sorted(set(samples.groupby("task")["doc_id"].nunique()))
        n_text = f"{'/'.join(map(str, per_task))} questions per task"
        shown = readable_table(table.rename_axis(index={"variant": "method"}), metrics_of).rename(columns={"method": "variant"})
        for i, column in enumerate(FLAGS):
            shown.insert(2 + i, column, table[column].to_numpy())
        s.out["out"].mkdir(parents=True)
        table.to_csv(s.out["out"] / "table.csv")
        (s.out["out"] / "table.md").write_text(
            f"{n_text} per run; [{options['confidence']:.0%} paired-bootstrap interval]; Sensitivity / Diversity: "
            "whether the score uses the term; Fusion: how the two are combined (none: one term alone).\n\n"
            + stats.markdown_frame(shown))
        figure = figures.save(figures.ablation_bars(table, weights_note(args.model), questions=n_text),
                              s.out["figures"] / "ablation.png")
        metrics = {f"avg/{v}-{t}": float(a) for (t, v), a in table["Avg"].items()}
        write_json(s.out["metrics"], metrics)
        s.log(metrics=metrics, tables={"ablation": table.reset_index()}, images={"ablation": figure})


if __name__ == "__main__":
    main()
