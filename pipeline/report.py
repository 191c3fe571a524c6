"""Stage ``report``: one markdown page (``outputs/report/README.md``) with every table (markdown, and
CSV next to it) and every figure of the pipeline, copied into the report folder.

The page says which commit and when it was made; every table says what its numbers are (unit or
meaning) and on how many questions or images it rests. Tables the stages write as markdown
(``*.md``: intervals already formatted) are copied as they are; the others are rendered from their
CSV with named, unit-bearing headers (no index column, empty cells where a value does not apply).
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd

from analysis import stats

from ._common import parser, stage, weights_note, write_json


def _fixed(digits: int):
    return lambda v: "" if pd.isna(v) else f"{v:.{digits}f}"


def _count(v) -> str:
    return "" if pd.isna(v) else str(int(v))


def _percent(v) -> str:
    return "" if pd.isna(v) else f"{100 * v:.1f}"


# CSV column -> (header with unit or meaning, cell format); columns not listed keep their name, values as they are
COLUMNS = {
    "h": ("h (finite-difference step)", str), "m": ("m (directions)", str),
    "score": ("score (%: F1 for existence, else accuracy)", _percent), "questions": ("questions", str),
    "method": ("method", str), "model": ("model", str), "tokens": ("visual tokens", str),
    "prefill_ms": ("prefill (ms)", _fixed(1)), "e2e_ms": ("prefill + new tokens (ms)", _fixed(1)),
    "text_tokens": ("text tokens", str), "gflops": ("GFLOPs (prefill, counted by the ledger)", _fixed(3)),
    "gflops_pruning": ("GFLOPs of the pruning step", _fixed(3)),
    "tflops": ("TFLOPs (prefill, formula)", _fixed(2)), "tflops_llm_visual_only": ("TFLOPs (LLM over visual tokens)", _fixed(2)),
    "paper_app_d": ("paper App. D TFLOPs", _fixed(2)), "seconds": ("seconds per forward", _fixed(3)),
    "images": ("images", _count), "images measured exactly": ("images measured exactly", _count),
}


def render_csv(data: pd.DataFrame, index_name: str | None = None, cell=None) -> str:
    """A CSV table as markdown: an unnamed first column (a written index) gets ``index_name``; headers and
    cells from :data:`COLUMNS` (``cell`` for columns not listed); empty where a value does not apply."""
    if str(data.columns[0]).startswith("Unnamed"):
        data = data.rename(columns={data.columns[0]: index_name or "row"})
    shown = pd.DataFrame(index=data.index)
    for column in data.columns:
        header, fmt = COLUMNS.get(column, (column, None))
        fmt = fmt or (cell if cell and column != data.columns[0] else lambda v: "" if pd.isna(v) else f"{v:.3g}"
                      if isinstance(v, float) else str(v))
        shown[header] = data[column].map(fmt)
    return stats.markdown_frame(shown)


def provenance(root=".") -> tuple[str, str]:
    """(commit, UTC date) of the report: ``git rev-parse`` (``+ uncommitted changes`` when the tree is dirty)."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        return commit + (" + uncommitted changes" if dirty else ""), date
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)", date


def sections(params: dict, metrics: dict) -> list[dict]:
    """The report's sections in reading order: title, caption (what the numbers are, on how much data),
    tables (stage markdown ``*.md`` or CSV), figures (under outputs/figures/)."""
    sens, proxy, eff = params.get("sensitivity", {}), metrics.get("proxy", {}), params.get("efficiency", {})
    timed = metrics.get("efficiency", {})
    conditions = (f" Timing conditions: {timed.get('conditions/torch_threads', '?')} torch thread(s), 1-min load average "
                  f"{timed.get('conditions/load_before', float('nan')):.2f} before / "
                  f"{timed.get('conditions/load_after', float('nan')):.2f} after, "
                  f"{timed.get('conditions/unsteady_timings', '?')} unsteady timing(s) (outputs/efficiency/conditions.json).")
    if timed.get("conditions/flagged"):
        conditions = " **FLAGGED: timed on a loaded machine or with unsteady repeats; not a result.**" + conditions
    proxy_n = ", ".join(f"{k.split('/', 1)[1]} {v}" for k, v in proxy.items() if k.startswith("samples/"))
    return [
        {"title": "Results (paper Tables 1-4 form)",
         "caption": "Score per task in % (accuracy; F1 of 'yes' for existence) with its 95% paired-bootstrap interval; "
                    "Avg = mean over tasks of score / unpruned score (the paper's normalised average), Mean = plain mean "
                    "of the task scores.",
         "tables": ["results/table.md"], "csv": ["results/table.csv"], "figures": ["results/avg_vs_tokens.png"]},
        {"title": "Paired differences to unpruned and to the reference", "caption": "",
         "tables": ["results/comparisons.md"], "csv": ["results/comparisons.csv"], "figures": ["results/differences.png"]},
        {"title": "Significance: McNemar's exact test per task and budget", "caption": "",
         "tables": ["results/mcnemar.md"], "csv": ["results/mcnemar.csv"], "figures": []},
        {"title": "Spread over seeds of the stochastic methods", "caption": "",
         "tables": ["results/seeds.md"], "csv": ["results/seeds.csv"], "figures": []},
        {"title": "Ablation of the selection score (Table 5)", "caption": "",
         "tables": ["ablation/table.md"], "csv": ["ablation/table.csv"], "figures": ["ablation/ablation.png"]},
        {"title": "Step size h (Fig. 4a)", "caption": "ZOO-Prune's score on the sweep task at the sweep budget, one lmms-eval "
                                                         "run per h (log axis in the figure).",
         "tables": ["sweep_h/sweep.csv"], "figures": ["sweep_h/sweep_h.png"]},
        {"title": "Directions m (Fig. 4b)", "caption": "As above, one run per m; the closed form (m -> infinity) "
                                                        f"scores {metrics.get('sweep_m', {}).get('score/closed_form', float('nan')):.3f}.",
         "tables": ["sweep_m/sweep.csv"], "figures": ["sweep_m/sweep_m.png"]},
        {"title": "Projector as a proxy for the encoder (Fig. 2)",
         "caption": f"Per image, Spearman rho between projector and end-to-end encoder token sensitivity (images: {proxy_n}); "
                    "noise: rho between two independent draws of the sampled encoder estimate (1 = no estimator noise).",
         "tables": ["proxy/summary.csv"], "cell": _fixed(3), "figures": ["proxy/proxy_kde.png"]},
        {"title": "Sensitivity estimators: agreement",
         "caption": f"Mean Spearman rho between the estimators' per-token sensitivities over {sens.get('samples', '?')} "
                    "test images (1 = same ranking).",
         "tables": ["sensitivity/agreement.csv"], "index": "estimator", "cell": _fixed(3),
         "figures": ["sensitivity/agreement.png"]},
        {"title": "Kept tokens (Fig. 6 / Fig. B)",
         "caption": f"{sens.get('overlay_samples', '?')} test images; pruned tokens dimmed.", "tables": [],
         "figures": ["sensitivity/overlays.png"]},
        {"title": "Efficiency on the testbed, measured (Fig. 5)",
         "caption": f"Milliseconds per image on this CPU: median (and min / max) of {eff.get('repeats', '?')} repeats per "
                    f"image after a warm-up, mean over {eff.get('samples', '?')} test images; prefill + new tokens = "
                    f"{eff.get('new_tokens', '?')} greedy tokens; GFLOPs counted by the ledger (zoo_prune.flops) on the "
                    f"model's graph, measured and counted side by side in the figure." + conditions,
         "tables": ["efficiency/testbed.csv"], "figures": ["efficiency/prefill.png", "efficiency/e2e.png"]},
        {"title": "One 7B-width decoder layer on this CPU",
         "caption": f"Random weights, fp32, median of {eff.get('layer_repeats', '?')} repeats.",
         "tables": ["efficiency/layer_cpu.csv"], "figures": ["efficiency/layer_cpu.png"]},
    ]


def main(argv=None) -> None:
    p = parser(__doc__, inputs=("model",))
    p.add_argument("--outputs", default="outputs")
    p.add_argument("--out", default="outputs/report")
    args = p.parse_args(argv)
    with stage("report", args, ["sensitivity", "efficiency"], ["out"]) as s:
        root, out = Path(args.outputs), s.out["out"]
        (out / "figures").mkdir(parents=True)
        metrics = {path.stem: json.loads(path.read_text()) for path in sorted((root / "metrics").glob("*.json"))}
        commit, date = provenance()
        note = weights_note(args.model)
        lines = ["# zoo-prune: experiment report", "",
                 f"Profile `{s.profile}`, model `{args.model}`; commit `{commit}`, made {date}."]
        if note:
            lines += ["", f"**{note}**"]
        for section in sections(s.params, metrics):
            lines += ["", f"## {section['title']}", ""]
            if section["caption"]:
                lines += [section["caption"], ""]
            for table in section["tables"]:
                source = root / table
                if not source.exists():
                    raise FileNotFoundError(f"table {source} not found; run the stage that writes it (dvc repro)")
                name = table.replace("/", "_")
                if table.endswith(".md"):
                    lines += [source.read_text().rstrip(), ""]
                else:
                    data = pd.read_csv(source)
                    data.to_csv(out / name, index=False)
                    lines += [render_csv(data, section.get("index"), section.get("cell")), f"CSV: [{name}]({name})", ""]
            for table in section.get("csv", []):
                name = table.replace("/", "_")
                shutil.copy(root / table, out / name)
                lines += [f"CSV: [{name}]({name})", ""]
            for image in section["figures"]:
                source = root / "figures" / image
                if not source.exists():
                    raise FileNotFoundError(f"figure {source} not found; run the stage that draws it (dvc repro)")
                target = image.replace("/", "_")
                shutil.copy(source, out / "figures" / target)
                lines.append(f"![{section['title']}](figures/{target})")
        (out / "README.md").write_text("\n".join(lines) + "\n")
        write_json(out / "metrics.json", metrics)
        s.log(images={p.stem: p for p in sorted((out / "figures").glob("*.png"))})


if __name__ == "__main__":
    main()
