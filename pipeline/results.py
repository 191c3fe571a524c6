"""Stage ``results``: the paper-form table of every evaluate run (Tables 1-4) with paired-bootstrap
intervals, paired differences, McNemar's test and the seeds' spread, from the runs' per-question
correctness (``<run>/samples.csv``).

Outputs (``--out``): ``table.{csv,md}`` (per task score, relative to unpruned, normalised Avg and plain
Mean, each with its 95% interval), ``comparisons.{csv,md}`` (every method minus unpruned and minus
``results.reference`` at the same budget, with intervals; ``*`` = interval excludes 0),
``mcnemar.{csv,md}`` (``results.mcnemar`` = [a, b]: McNemar's exact test per task and budget on the
questions one gets right and the other wrong; F1 tasks by the interval of the paired F1 difference),
``seeds.{csv,md}`` (``evaluate.seeded_methods`` over their main seed and ``evaluate.seeds``: mean, sd,
min, max), ``bootstrap.csv`` (every interval, long form). Figures: Avg against kept tokens with
error bars; every method's Avg difference to the reference with its interval.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis import figures, stats

from ._common import StageError, parser, stage, weights_note, write_json

UNPRUNED = stats.UNPRUNED


def tokens_per_image(model_dir) -> int:
    """N visual tokens per image of a LLaVA model folder (its config.json)."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"model config {path} not found")
    vision = json.loads(path.read_text())["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def expected_runs(params: dict, methods: list[str]) -> list[tuple[str, int | None]]:
    return [(UNPRUNED, None)] + [(m, k) for m in methods for k in params["budgets"]]


def seed_runs(params: dict, budgets: list[int], methods: list[str]) -> list[str]:
    """Folder names of the extra seeds' runs (``<method>-<keep>-seed<s>``) params asks for (of evaluated ``methods``)."""
    evaluate = params["evaluate"]
    seeded, seeds = evaluate.get("seeded_methods", []), evaluate.get("seeds", [])
    for name, value in (("seeded_methods", seeded), ("seeds", seeds)):
        if not isinstance(value, list):
            raise StageError(f"params evaluate.{name} = {value!r} must be a list")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise StageError(f"params evaluate.seeds has {bad}; seeds are ints >= 0")
    return [stats.run_name(m, k, s) for m in seeded if m in methods for k in budgets for s in seeds]


def bootstrap_runs(samples: pd.DataFrame, methods: list[str], budgets: list[int], reference: str | None,
                   options: dict) -> pd.DataFrame:
    """Every main run's scores and its differences to unpruned and to ``reference`` at its budget (long form,
    with ``tokens`` and ``method``); one paired bootstrap per budget, unpruned's own rows from the first."""
    parts = []
    for i, keep in enumerate(budgets):
        names = [stats.run_name(m, keep) for m in methods]
        references = [UNPRUNED] + ([stats.run_name(reference, keep)] if reference else [])
        part = stats.paired_bootstrap(samples, [UNPRUNED, *names], references=references, **options)
        part = part[(part["run"] != UNPRUNED) | ((part["versus"] == "") & (i == 0))]
        parts.append(part)
    data = pd.concat(parts, ignore_index=True)
    parsed = data["run"].map(stats.parse_run_name)
    return data.assign(method=parsed.str[0], keep=parsed.str[1],
                       versus=data["versus"].map(lambda v: stats.parse_run_name(v)[0] if v else ""))


def check_agrees(boot: pd.DataFrame, runs: pd.DataFrame) -> None:
    """The scores recomputed from samples.csv must equal lmms-eval's (scores.json)."""
    own = {(r, m): v for r, m, v in boot.loc[boot["versus"] == "", ["run", "measure", "value"]].itertuples(index=False)}
    for row in runs.itertuples():
        name = stats.run_name(row.method, None if pd.isna(row.keep) else int(row.keep))
        mine = own.get((name, row.task))
        if mine is None or abs(mine - row.score) > 1e-6:
            raise StageError(f"run {name}: task {row.task} scores {row.score} in scores.json but {mine} from "
                             "samples.csv; rerun its evaluate stage")


def interval_table(table: pd.DataFrame, boot: pd.DataFrame, metrics: dict[str, str], tokens: int) -> pd.DataFrame:
    """``table`` (``stats.paper_table``) with ``<measure> low`` / ``<measure> high`` and ``questions`` columns."""
    own = boot[boot["versus"] == ""].copy()
    own["tokens"] = own["keep"].where(own["method"] != UNPRUNED, tokens).astype(int)
    wide = own.pivot_table(index=["tokens", "method"], columns="measure", values=["low", "high"], aggfunc="first",
                           dropna=False)
    out = table.copy()
    for measure in [*metrics, "Avg", "Mean"]:
        at = out.columns.get_loc(measure) + 1
        out.insert(at, f"{measure} high", wide[("high", measure)].reindex(out.index))
        out.insert(at, f"{measure} low", wide[("low", measure)].reindex(out.index))
    questions = own[own["measure"] == "Mean"].set_index(["tokens", "method"])["questions"]
    out["questions"] = questions.reindex(out.index).astype(int)
    return out


def readable_table(table: pd.DataFrame, metrics: dict[str, str]) -> pd.DataFrame:
    """The results table for the eye: scores in % with [95% interval], Avg in % of unpruned; no rel columns."""
    rows = table.reset_index()
    shown = pd.DataFrame({"tokens": rows["tokens"], "method": rows["method"],
                          "pruned %": rows["pruned %"].map(lambda v: f"{v:.1f}")})
    for task, metric in metrics.items():
        shown[f"{task} ({stats.metric_label(metric)})"] = [stats.interval(v, lo, hi) for v, lo, hi in
                                                          zip(rows[task], rows[f"{task} low"], rows[f"{task} high"])]
    shown["Avg (% of unpruned)"] = [stats.interval(v, lo, hi) for v, lo, hi in zip(rows["Avg"], rows["Avg low"], rows["Avg high"])]
    shown["Mean (%)"] = [stats.interval(v, lo, hi) for v, lo, hi in zip(rows["Mean"], rows["Mean low"], rows["Mean high"])]
    return shown


def readable_comparisons(boot: pd.DataFrame, metrics: dict[str, str]) -> pd.DataFrame:
    """Paired differences in percentage points with [95% interval]; ``*`` where the interval excludes 0."""
    diffs = boot[boot["versus"] != ""]
    rows = []
    for (keep, method, versus), group in diffs.groupby(["keep", "method", "versus"], sort=False):
        cells = group.set_index("measure")
        row = {"tokens": int(keep), "method": method, "minus": versus}
        for measure in [*metrics, "Avg", "Mean"]:
            c = cells.loc[measure]
            row[measure if measure in ("Avg", "Mean") else measure] = stats.interval(c["value"], c["low"], c["high"],
                                                                                   signed=True, star=True)
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.rename(columns={"Avg": "Avg (points of % of unpruned)", "Mean": "Mean (points)"})


def mcnemar_tables(samples: pd.DataFrame, pair: list[str], budgets: list[int], options: dict,
                   alpha: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(CSV, markdown) of ``pair`` = [a, b] per budget and task: McNemar's exact test; for F1 tasks the paired
    bootstrap interval of the F1 difference decides (the score is no per-question mean)."""
    a, b = pair
    rows = []
    for keep in budgets:
        names = stats.run_name(a, keep), stats.run_name(b, keep)
        tests = stats.mcnemar(samples, *names)
        boot = stats.paired_bootstrap(samples, [names[0]], references=[names[1]], **options)
        diff = boot[boot["versus"] == names[1]].set_index("measure")
        for t in tests.itertuples():
            d = diff.loc[t.task]
            f1 = t.metric == "f1"
            significant = (d["low"] > 0 or d["high"] < 0) if f1 else t.p < alpha
            rows.append({"tokens": keep, "task": t.task, "metric": t.metric, "questions": t.questions,
                         f"{a} correct": t.a_correct, f"{b} correct": t.b_correct, f"only {a} correct": t.a_only,
                         f"only {b} correct": t.b_only, "p (McNemar exact)": t.p, "difference": d["value"],
                         "difference low": d["low"], "difference high": d["high"],
                         "test": "paired bootstrap of F1" if f1 else "McNemar exact", "significant": bool(significant)})
    data = pd.DataFrame(rows)
    shown = pd.DataFrame({
        "tokens": data["tokens"], "task": data["task"].str.removeprefix("testbed_"), "questions": data["questions"],
        f"{a} - {b} (points)": [stats.interval(v, lo, hi, signed=True) for v, lo, hi in
                                zip(data["difference"], data["difference low"], data["difference high"])],
        f"only {a} right": data[f"only {a} correct"], f"only {b} right": data[f"only {b} correct"],
        "McNemar exact p": [f"{p:.3g}" + (" (accuracy; F1 decided by the interval)" if m == "f1" else "")
                            for p, m in zip(data["p (McNemar exact)"], data["metric"])],
        f"significant at {alpha}": data["significant"].map({True: "yes", False: "no"})})
    return data, shown


def readable_seeds(spread: pd.DataFrame) -> pd.DataFrame:
    """Mean +- sd over seeds (in %), min-max, per method, budget and measure."""
    return pd.DataFrame({"tokens": spread["keep"].astype(int), "method": spread["method"],
                         "measure": spread["task"].map(lambda t: {"Avg": "Avg (% of unpruned)", "Mean": "Mean (%)"}.get(t, t.removeprefix("testbed_"))),
                         "seeds": spread["seeds"],
                         "mean +- sd (%)": [f"{100 * m:.1f} +- {100 * s:.1f}" for m, s in zip(spread["mean"], spread["sd"])],
                         "min - max (%)": [f"{100 * lo:.1f} - {100 * hi:.1f}" for lo, hi in zip(spread["min"], spread["max"])]})


def main(argv=None) -> None:
    p = parser(__doc__, "results", inputs=("runs", "model"))
    args = p.parse_args(argv)
    with stage("results", args, ["evaluate", "budgets", "results"], ["out", "metrics", "figures"]) as s:
        cfg, res = s.params["evaluate"], s.params["results"]
        budgets = s.params["budgets"]
        methods = cfg["zoo_methods"] + cfg["baselines"]
        reference, pair = res["reference"], res["mcnemar"]
        if reference not in methods:
            raise StageError(f"params results.reference = {reference!r}; choose one of the evaluated methods {methods}")
        if any(m not in methods for m in pair):
            raise StageError(f"params results.mcnemar = {pair!r} must name two evaluated methods of {methods}")
        options = {key: res[key] for key in ("confidence", "resamples", "seed")}
        alpha = round(1 - options["confidence"], 10)
        expected = expected_runs(s.params, methods)
        tokens = tokens_per_image(args.model)
        runs = stats.read_runs(args.runs, expected)
        extra = seed_runs(s.params, budgets, methods)
        samples = stats.read_samples(args.runs, [stats.run_name(m, k) for m, k in expected] + extra)
        main_samples = samples[~samples["run"].isin(extra)]
        metrics_of = dict(main_samples.drop_duplicates("task").sort_values("task")[["task", "metric"]].values)

        boot = bootstrap_runs(main_samples, methods, budgets, reference, options)
        check_agrees(boot, runs)
        table = interval_table(stats.paper_table(runs, tokens, methods), boot, metrics_of, tokens)
        questions = int(table["questions"].iloc[0])
        per_task = sorted(set(main_samples.groupby("task")["doc_id"].nunique()))
        caption = (f"{'/'.join(map(str, per_task))} test questions per task ({questions} in all) per run; "
                   f"[{options['confidence']:.0%} paired-bootstrap interval, {options['resamples']} resamples of the questions]")
        comparisons = boot[boot["versus"] != ""]
        mcnemar, mcnemar_shown = mcnemar_tables(main_samples, pair, budgets, options, alpha)
        seeded = samples[samples["method"].isin(cfg.get("seeded_methods", []))]
        base = table.xs(UNPRUNED, level="method")[list(metrics_of)].iloc[0].to_dict()
        spread = stats.seed_spread(seeded, base)

        out = s.out["out"]
        out.mkdir(parents=True)
        table.to_csv(out / "table.csv")
        boot.to_csv(out / "bootstrap.csv", index=False)
        comparisons.to_csv(out / "comparisons.csv", index=False)
        mcnemar.to_csv(out / "mcnemar.csv", index=False)
        spread.to_csv(out / "seeds.csv", index=False)
        (out / "table.md").write_text(f"{caption}\n\n" + stats.markdown_frame(readable_table(table, metrics_of)))
        (out / "comparisons.md").write_text(
            f"Paired differences (method minus `unpruned` or `{reference}` at the same budget), percentage points; "
            f"* = the {options['confidence']:.0%} interval excludes 0. {caption}\n\n"
            + stats.markdown_frame(readable_comparisons(comparisons, metrics_of)))
        (out / "mcnemar.md").write_text(
            f"`{pair[0]}` against `{pair[1]}`: McNemar's exact test on the questions exactly one of them answers right "
            f"(accuracy tasks); the F1 task by the paired-bootstrap interval of the F1 difference. {caption}\n\n"
            + stats.markdown_frame(mcnemar_shown))
        seeds_note = (f"Seeds of {cfg.get('seeded_methods')}: the main run's and {cfg.get('seeds')} "
                      f"(spread over seeds, {'/'.join(map(str, per_task))} questions per task each).")
        (out / "seeds.md").write_text(f"{seeds_note}\n\n" + (stats.markdown_frame(readable_seeds(spread)) if len(spread)
                                                             else "No method has more than one seed.\n"))
        note = weights_note(args.model)
        n_text = f"{'/'.join(map(str, per_task))} questions per task"
        images = {
            "avg_vs_tokens": figures.save(figures.avg_vs_tokens(table, note, spread=spread, questions=n_text),
                                          s.out["figures"] / "avg_vs_tokens.png"),
            "differences": figures.save(figures.differences(comparisons, reference, note, questions=n_text),
                                        s.out["figures"] / "differences.png")}
        metrics = {f"avg/{m}-{t}": float(v) for (t, m), v in table["Avg"].items() if m != UNPRUNED}
        metrics |= {f"avg_low/{m}-{t}": float(v) for (t, m), v in table["Avg low"].items() if m != UNPRUNED}
        metrics |= {f"avg_high/{m}-{t}": float(v) for (t, m), v in table["Avg high"].items() if m != UNPRUNED}
        metrics |= {f"significant/{pair[0]}_vs_{pair[1]}/{r.task}-{r.tokens}": bool(r.significant) for r in mcnemar.itertuples()}
        metrics["questions_per_run"] = questions
        write_json(s.out["metrics"], metrics)
        s.log(metrics=metrics, tables={"results": table.reset_index(), "comparisons": comparisons, "mcnemar": mcnemar,
                                       "seeds": spread}, images=images)


if __name__ == "__main__":
    main()
