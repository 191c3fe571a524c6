"""Stage ``report``: one markdown page (``outputs/report/README.md``) with every table (markdown, and
CSV next to it) and every figure of the pipeline, copied into the report folder.

The page says which commit and when it was made; every table says what its numbers are (unit or
meaning) and on how many questions or images it rests. Tables the stages write as markdown
(``*.md``: intervals already formatted) are copied as they are; the others are rendered from their
CSV with named, unit-bearing headers (no index column, empty cells where a value does not apply).

Profile ``paper`` (paper/dvc.yaml: ``--params <dir>/params.yaml --outputs <dir>/outputs --out <dir>/report``):
``README.md`` (provenance, every model's checkpoint: the paper's, a random-weight stand-in, or absent and
skipped; every page's status) and one page per part of the paper (Tables 1-4, Table 5, sensitivity per
model with Fig. 6, Fig. 2, Fig. 4, Fig. 5 / App. D), the paper's published numbers on each. A page's tables
(``*.md``; ``*.csv`` without one) and figures (``figures/*.png``) are found in its stage folders by kind
(``analysis.outputs``); a folder absent says "not run", a skip record says why. When any checkpoint record
(``<outputs>/checkpoints/<model>/checkpoint.json``) is a random-weight stand-in, every page starts with the
RANDOM-WEIGHT REHEARSAL note and every figure copied into the report carries it on a band above it.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd

from analysis import stats

from ._common import parser, profile_of, stage, weights_note, write_json


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
    if profile_of(args.params) == "paper":  # paper/dvc.yaml's command: --params, --outputs, --out
        return paper_main(argv)
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


# ---------------------------------------------------------------- the paper profile (paper/dvc.yaml)
#
# README.md (the index: provenance, the models and their checkpoints, every page's status) and one page per
# part of the paper; each page's tables and figures are found in its stage folders by kind (analysis.outputs),
# so a stage that writes another table or figure appears without a change here. When any checkpoint record is
# a random-weight stand-in, every page starts with the RANDOM-WEIGHT REHEARSAL note and every figure copied
# into the report carries it on its face.

MAX_ROWS = 60  # a CSV without a markdown rendering is shown as a table up to this many rows (else linked)

# page -> (title, [(stage folder under --outputs, section title)], what the paper publishes for it)
PAGES = {
    "results": ("Tables 1-4: every model's benchmarks, the paper's numbers beside", [("results", "Tables 1-4")],
                "beside"),
    "ablation": ("Table 5: ablation of the selection score", [("ablation", "Table 5")], "beside"),
    "sensitivity": ("Sensitivity estimators per model: agreement, Fig. 6 overlays", [("sensitivity", "Sensitivity")],
                    "The paper prints no numbers for the estimators' agreement; Fig. 6 is a picture (kept tokens)."),
    "proxy": ("Fig. 2: the projector as a proxy for the vision encoder", [("proxy", "Proxy")], ("fig2",)),
    "sweeps": ("Fig. 4: step size h and directions m", [("sweep_h", "Fig. 4a: h"), ("sweep_m", "Fig. 4b: m")],
               "Fig. 4 is a plot: the paper prints no numbers for it (its text: h and m matter little near h = 0.01, m = 64)."),
    "efficiency": ("Fig. 5 / App. D: efficiency and FLOPs", [("efficiency", "Efficiency")], ("fig5", "appD")),
}


class PaperReport:
    """Writes the pages into ``out``: figures copied (stamped with ``note`` when it is set), CSVs copied."""

    def __init__(self, outputs: Path, out: Path, note: str):
        self.outputs, self.out, self.note = outputs, out, note
        self.figures: list[Path] = []
        (out / "figures").mkdir(parents=True)
        (out / "tables").mkdir()

    def banner(self) -> list[str]:
        return [f"> **{self.note}**", ""] if self.note else []

    def figure(self, source: Path, name: str) -> str:
        from analysis import figures

        target = self.out / "figures" / f"{name}.png"
        if self.note:
            figures.stamp(source, target, self.note)
        else:
            shutil.copy(source, target)
        self.figures.append(target)
        return f"figures/{target.name}"

    def section(self, found, title: str, level: int, prefix: str) -> list[str]:
        lines = [f"{'#' * level} {title}", ""]
        where = f"`{found.path}`"
        if found.status == "not run":
            return lines + [f"*Not run*: nothing under {where} yet (its stage has not run).", ""]
        if found.status == "skipped":
            return lines + [f"*Skipped*: {found.reason}", ""]
        for md in found.markdown:
            lines += [md.read_text().rstrip(), ""]
        links = []
        for path in found.csv:
            name = f"{prefix}_{path.name}"
            shutil.copy(path, self.out / "tables" / name)
            links.append(f"[{path.name}](tables/{name})")
        for path in found.csv_alone():
            data = pd.read_csv(path)
            if len(data) <= MAX_ROWS:
                notes = data.pop("note").dropna().unique() if "note" in data else []  # a stand-in's: the page says it
                lines += [f"`{path.name}`" + (f" (*{notes[0]}*)" if len(notes) == 1 and not self.note else "")
                          + ":", "", render_csv(data), ""]
        if links:
            lines += ["CSV: " + ", ".join(links), ""]
        for path in found.figures:
            lines += [f"![{title}: {path.stem}]({self.figure(path, f'{prefix}_{path.stem}')})", ""]
        for name, part in found.parts.items():
            lines += self.section(part, name, level + 1, f"{prefix}_{name}")
        return lines

    def page(self, name: str, title: str, folders: list[tuple[str, str]], paper) -> tuple[list[str], dict]:
        from analysis.outputs import listing

        lines = self.banner() + [f"# {title}", "", "[Back to the report](README.md)", ""]
        if isinstance(paper, tuple):
            from analysis.paper import published

            lines += ["## The paper's published numbers", "", stats.markdown_frame(published(paper)), ""]
        elif paper == "beside":
            lines += ["The paper's published number stands beside every measured cell (analysis/paper_numbers.csv).", ""]
        else:
            lines += [paper, ""]
        status = {}
        for folder, heading in folders:
            found = listing(self.outputs / folder)
            status[folder] = found
            lines += self.section(found, heading, 2, folder.replace("/", "_"))
        (self.out / f"{name}.md").write_text("\n".join(lines) + "\n")
        return lines, status


def collect_metrics(found, prefix: str) -> dict:
    metrics = {prefix: found.metrics} if found.metrics else {}
    for name, part in found.parts.items():
        metrics |= collect_metrics(part, f"{prefix}/{name}")
    return metrics


def paper_main(argv) -> None:
    """The paper profile's report: README.md and one page per part of the paper, in ``--out``."""
    from analysis.outputs import checkpoint_records

    from . import _paper

    p = parser(__doc__, inputs=())
    p.add_argument("--outputs", required=True, help="<paper.dir>/outputs")
    p.add_argument("--out", required=True, help="<paper.dir>/report")
    args = p.parse_args(argv)
    with stage("report", args, ["paper"], ["out"]) as s:
        outputs = Path(args.outputs)
        found = checkpoint_records(outputs) or _paper.records(s.params)
        records = {m: found[m] for m in s.params["paper"]["models"] if m in found} | found  # the params' order
        note = _paper.weights_note(records.values())
        report = PaperReport(outputs, s.out["out"], note)
        commit, date = provenance()
        metrics, statuses = {}, {}
        for name, (title, folders, paper) in PAGES.items():
            _, status = report.page(name, title, folders, paper)
            statuses[name] = (title, status)
            for folder, found in status.items():
                metrics |= collect_metrics(found, folder)
        lines = report.banner() + [
            "# zoo-prune: the paper's tables and figures, measured", "",
            f"Profile `paper`, outputs `{outputs}`; commit `{commit}`, made {date}. Each table sets the paper's "
            "published number (analysis/paper_numbers.csv) beside the measured one.", "",
            "## Models", "", "| model | checkpoint | weights | revision |", "|---|---|---|---|"]
        for model in s.params["paper"]["models"]:
            record = records.get(model)
            if record is None:
                lines.append(f"| {model} | no record (the checkpoints stage has not run) | | |")
                continue
            weights = ("**random-weight stand-in**" if _paper.random_weights(record) else "the checkpoint's") \
                if record.get("available") else f"**absent, skipped**: {record.get('reason')}"
            lines.append(f"| {model} | `{record.get('pretrained')}` | {weights} | {record.get('revision') or ''} |")
        skipped = [m for m, r in records.items() if not r.get("available")]
        lines += [""] + ([f"Skipped models (absent checkpoints): {', '.join(f'**{m}**' for m in skipped)}; their "
                          "entries wrote skip records and their tables say so.", ""] if skipped else [])
        lines += ["## Pages", "", "| page | stage outputs |", "|---|---|"]
        for name, (title, status) in statuses.items():
            parts = []
            for folder, found in status.items():
                extra = ""
                if found.parts:
                    kinds = {}
                    for part, sub in found.parts.items():
                        kinds.setdefault(sub.status, []).append(part)
                    extra = " (" + "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items()) + ")"
                parts.append(f"`{folder}`: {found.status}{extra}")
            lines.append(f"| [{title}]({name}.md) | {'; '.join(parts)} |")
        (s.out["out"] / "README.md").write_text("\n".join(lines) + "\n")
        metrics["rehearsal"] = bool(note)
        write_json(s.out["out"] / "metrics.json", metrics)
        s.log(images={p.stem: p for p in report.figures})


if __name__ == "__main__":
    main()
