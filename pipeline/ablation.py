"""Stage ``ablation``: Table 5 (sensitivity only, diversity only = DivPrune, sum, multiply = ZOO-Prune)
at every budget, from the evaluate runs."""

from __future__ import annotations

from analysis import figures, stats

from ._common import StageError, need, parser, stage, weights_note, write_json
from .results import expected_runs, tokens_per_image

# method -> (sensitivity, diversity, fusion), the columns of the paper's Table 5
VARIANTS = {"sensitivity_only": ("yes", "", "-"), "divprune": ("", "yes", "-"),
            "sum_fusion": ("yes", "yes", "sum"), "zoo": ("yes", "yes", "multiply")}


def main(argv=None) -> None:
    p = parser(__doc__, "ablation", inputs=("runs", "model"))
    args = p.parse_args(argv)
    with stage("ablation", args, ["ablation", "budgets"], ["out", "metrics", "figures"]) as s:
        variants = need(s.params["ablation"], "ablation", "variants", list)
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise StageError(f"params ablation.variants has {unknown}; choose from {list(VARIANTS)}")
        runs = stats.read_runs(args.runs, expected_runs(s.params, variants))
        table = stats.paper_table(runs, tokens_per_image(args.model), variants).drop(index=stats.UNPRUNED, level="method")
        flags = table.index.get_level_values("method").map(VARIANTS)
        for i, column in enumerate(("Sensitivity", "Diversity", "Fusion")):
            table.insert(i, column, [f[i] for f in flags])
        table = table.rename_axis(index={"method": "variant"})
        s.out["out"].mkdir(parents=True)
        table.to_csv(s.out["out"] / "table.csv")
        (s.out["out"] / "table.md").write_text(stats.markdown_table(table))
        figure = figures.save(figures.ablation_bars(table, weights_note(args.model)), s.out["figures"] / "ablation.png")
        metrics = {f"avg/{v}-{t}": float(a) for (t, v), a in table["Avg"].items()}
        write_json(s.out["metrics"], metrics)
        s.log(metrics=metrics, tables={"ablation": table.reset_index()}, images={"ablation": figure})


if __name__ == "__main__":
    main()
