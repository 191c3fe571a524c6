"""Stage ``results``: the paper-form table of every evaluate run (Tables 1-4): per-task score, score
relative to the unpruned model, normalised Avg; markdown + CSV, and Avg against kept tokens."""

from __future__ import annotations

import json
from pathlib import Path

from analysis import figures, stats

from ._common import need, parser, stage, weights_note, write_json


def tokens_per_image(model_dir) -> int:
    """N visual tokens per image of a LLaVA model folder (its config.json)."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"model config {path} not found")
    vision = json.loads(path.read_text())["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def expected_runs(params: dict, methods: list[str]) -> list[tuple[str, int | None]]:
    return [(stats.UNPRUNED, None)] + [(m, k) for m in methods for k in need(params, "params", "budgets", list)]


def main(argv=None) -> None:
    p = parser(__doc__, "results", inputs=("runs", "model"))
    args = p.parse_args(argv)
    with stage("results", args, ["evaluate", "budgets"], ["out", "metrics", "figures"]) as s:
        cfg = s.params["evaluate"]
        methods = need(cfg, "evaluate", "zoo_methods", list) + need(cfg, "evaluate", "baselines", list)
        runs = stats.read_runs(args.runs, expected_runs(s.params, methods))
        table = stats.paper_table(runs, tokens_per_image(args.model), methods)
        s.out["out"].mkdir(parents=True)
        table.to_csv(s.out["out"] / "table.csv")
        (s.out["out"] / "table.md").write_text(stats.markdown_table(table))
        figure = figures.save(figures.avg_vs_tokens(table, weights_note(args.model)), s.out["figures"] / "avg_vs_tokens.png")
        metrics = {f"avg/{m}-{t}": float(v) for (t, m), v in table["Avg"].items() if m != stats.UNPRUNED}
        write_json(s.out["metrics"], metrics)
        s.log(metrics=metrics, tables={"results": table.reset_index()}, images={"avg_vs_tokens": figure})


if __name__ == "__main__":
    main()
