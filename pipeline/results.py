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

Profile ``paper`` (paper/dvc.yaml: ``--params <dir>/params.yaml --runs <dir>/outputs/evaluate --out
<dir>/outputs/results``): Tables 1-4, one per model of ``paper.models`` (the paper's table that reports it:
``analysis/paper_numbers.csv``), rows = the model's methods at its budgets and the unpruned model, columns =
the paper's benchmarks (``paper.benchmarks``), each score in the paper's unit beside the paper's published
number and the difference (measured - paper; SparseVLM's cells marked as the paper's copies), Avg = mean
over the table's benchmarks of score / unpruned score. The paired statistics above on the benchmarks whose
runs hold a 0/1 outcome per question, the seeds of ``paper.seeds`` on every benchmark's score. A model whose
entries are skipped (absent checkpoint) is named with the reason; missing or failed entries are named under
its table. Everything inside ``--out``: ``<model>/`` (``table.md``, ``table.csv`` wide, ``cells.csv`` long,
``comparisons``, ``mcnemar``, ``bootstrap``, ``seeds``, ``figures/``), ``figures/avg_vs_budget.png``,
``summary.md`` (which model fills which table, what was skipped), ``metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis import figures, stats

from ._common import StageError, parser, profile_of, stage, weights_note, write_json

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
    if profile_of(args.params) == "paper":  # paper/dvc.yaml's command: --params, --runs, --out
        return paper_main(argv)
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


# ---------------------------------------------------------------- the paper profile (paper/dvc.yaml)
#
# Tables 1-4: one per model of paper.models (which is which: analysis/paper_numbers.csv's table and model
# columns), the measured score of each benchmark beside the paper's published number and the difference.
# Every output is inside --out: <model>/{table,cells,bootstrap,comparisons,mcnemar,seeds}.*, <model>/figures,
# figures/avg_vs_budget.png, summary.md, metrics.json.

PAPER_CAPTION = {"results": "Tables 1-4", "ablation": "Table 5"}


def paper_parser(name: str):
    """The paper stages' command line (paper/dvc.yaml): --params, --runs, --out; nothing else is written."""
    p = parser(__doc__ if name == "results" else "", inputs=("runs",))
    p.add_argument("--out", required=True, help=f"folder of every output (<paper.dir>/outputs/{name})")
    return p


def checkpoint_records(params: dict, folder: Path) -> dict[str, dict]:
    """Each model's checkpoint record: ``<folder>/<model>/checkpoint.json`` (the checkpoints stage's), else
    resolved now (``_paper.availability``)."""
    from . import _paper

    records = {}
    for model in params["paper"]["models"]:
        path = folder / model / "checkpoint.json"
        records[model] = json.loads(path.read_text()) if path.exists() else _paper.availability(params, model)
    return records


def read_model_runs(folder: Path, names: list[str], params: dict, metrics: dict[str, str]) -> dict:
    """The evaluate entries ``names`` of one model under ``folder``: ``scores`` (long form: run, method, keep,
    seed, task, benchmark, lmms_metric, score, value = the score in the paper's unit), ``present`` (runs with
    scores), ``skipped`` ({run: skip record}), ``missing`` (no folder), ``failed`` ({run: what is missing}),
    ``ignored`` (tasks with no paper column)."""
    from analysis.paper import benchmark_of, paper_units

    from . import _paper

    found = {"present": [], "skipped": {}, "missing": [], "failed": {}, "ignored": set()}
    records = []
    for name in names:
        run = folder / name
        if not run.is_dir():
            found["missing"].append(name)
            continue
        skip = _paper.skipped(run)
        if skip is not None:
            found["skipped"][name] = skip
            continue
        absent = [f for f in ("scores.json", "results.json") if not (run / f).exists()]
        if absent:
            found["failed"][name] = f"no {' / '.join(absent)} (the entry failed or never finished)"
            continue
        scores = json.loads((run / "scores.json").read_text())
        lmms = stats.task_metrics(json.loads((run / "results.json").read_text()))
        info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
        method, keep, extra = stats.parse_run_name(name)
        for task, score in scores.items():
            try:
                benchmark = benchmark_of(task, params)
            except ValueError:
                found["ignored"].add(task)
                continue
            metric = lmms.get(task, "")
            records.append({"run": name, "method": method, "keep": keep, "seed": extra if extra is not None else info.get("seed"),
                            "extra_seed": extra is not None, "task": task, "benchmark": benchmark, "lmms_metric": metric,
                            "score": float(score), "value": paper_units(score, metric, metrics.get(benchmark, ""))})
        found["present"].append(name)
    columns = ["run", "method", "keep", "seed", "extra_seed", "task", "benchmark", "lmms_metric", "score", "value"]
    found["scores"] = pd.DataFrame(records, columns=columns)
    found["scores"]["keep"] = pd.Series([r["keep"] for r in records], dtype=object)  # None (unpruned), 64, 0.2
    return found


def paired_statistics(samples: pd.DataFrame, methods: list[str], budgets: list, reference: str | None,
                      pair: list[str] | None, options: dict) -> dict:
    """The testbed's paired statistics on the benchmarks whose per-question correctness the runs hold
    (``samples.csv``: lmms-eval's 0/1 per-sample scores), per budget on the runs present: bootstrap intervals
    of every score and of Avg / Mean over those benchmarks, differences to unpruned and ``reference``,
    McNemar's test of ``pair``. ``note`` says what they rest on or why there are none."""
    present = set(samples["run"])
    if UNPRUNED not in present:
        return {"note": "no paired statistics: the unpruned run has no per-question table (samples.csv)"}
    parts, covered, unpaired = [], set(), set()
    for i, keep in enumerate(budgets):
        names = [stats.run_name(m, keep) for m in methods if stats.run_name(m, keep) in present]
        if not names:
            continue
        ref = stats.run_name(reference, keep) if reference else None
        references = [UNPRUNED] + ([ref] if ref in names else [])
        chosen = samples[samples["run"].isin([UNPRUNED, *names])]
        tasks = set.intersection(*(set(g["task"]) for _, g in chosen.groupby("run")))
        for task in sorted(tasks):  # paired: the same questions in every run (a 0/1 outcome may be absent in one)
            questions = {frozenset(g["doc_id"]) for _, g in chosen[chosen["task"] == task].groupby("run")}
            if len(questions) > 1:
                tasks.discard(task)
                unpaired.add(task)
        chosen = chosen[chosen["task"].isin(tasks)]
        if chosen.empty:
            continue
        part = stats.paired_bootstrap(chosen, [UNPRUNED, *names], references=references, **options)
        parts.append(part[(part["run"] != UNPRUNED) | ((part["versus"] == "") & (i == 0))])
        covered |= tasks
    if not parts:
        return {"note": "no paired statistics: no benchmark has per-question correctness in every run"}
    boot = pd.concat(parts, ignore_index=True)
    parsed = boot["run"].map(stats.parse_run_name)
    boot = boot.assign(method=parsed.str[0], keep=parsed.str[1],
                       versus=boot["versus"].map(lambda v: stats.parse_run_name(v)[0] if v else ""))
    result = {"bootstrap": boot, "comparisons": boot[boot["versus"] != ""], "benchmarks": sorted(covered)}
    if pair:
        both = [k for k in budgets if all(stats.run_name(m, k) in present for m in pair)]
        if both:
            alpha = round(1 - options["confidence"], 10)
            result["mcnemar"] = mcnemar_tables(samples[samples["task"].isin(covered)], pair, both, options, alpha)
    sizes = samples[samples["run"] == UNPRUNED].groupby("task")["doc_id"].nunique()
    result["note"] = (f"Paired statistics on the benchmarks whose runs record each question's 0/1 outcome (samples.csv): "
                      f"{', '.join(f'{t} ({sizes.get(t, 0)} questions)' for t in sorted(covered))}. A benchmark's score "
                      "here is recomputed from those outcomes: the fraction answered right (F1 of 'yes' where samples.csv "
                      "says f1), the table's number where the task's metric is that accuracy, not where it scores "
                      "otherwise (POPE's F1, MME's perception + cognition); Avg / Mean: over these benchmarks. "
                      f"[{options['confidence']:.0%} paired-bootstrap intervals, {options['resamples']} resamples of the questions]")
    if unpaired - covered:
        result["note"] += (f" Left out where the runs' 0/1 outcomes are on different questions (no pairing): "
                           f"{', '.join(sorted(unpaired - covered))}.")
    return result


def budget_sort(budgets) -> list:
    return sorted(budgets, key=float, reverse=True)


def model_tables(s, model: str, runs: Path, out: Path, methods: list[str], table: str | None, numbers: pd.DataFrame,
                 note: str, seeds: list[int] = (), reference: str | None = None, pair: list[str] | None = None,
                 flags: dict | None = None) -> dict:
    """One model's table in the paper's form with the paper's numbers beside (``table``), its paired statistics
    and seeds, written under ``out/<model>`` (``note``: the model's RANDOM-WEIGHT REHEARSAL note, on every table
    and figure); returns the model's summary (status, missing, metrics, avg cells)."""
    from analysis import paper
    from zoo_prune import method_class

    from . import _paper

    params = s.params
    budgets = budget_sort(params["paper"]["models"][model]["budgets"])
    main = [UNPRUNED] + [stats.run_name(m, k) for m in methods for k in budgets]
    extra = [stats.run_name(m, k, seed) for m in methods if method_class(m).stochastic() for k in budgets for seed in seeds]
    metrics_of = paper.benchmark_metrics(numbers)
    found = read_model_runs(runs / model, main + extra, params, metrics_of)
    summary = {"model": model, "table": table, "skipped": found["skipped"], "missing": found["missing"],
               "failed": found["failed"], "present": found["present"]}
    if not found["present"]:
        reasons = {r.get("reason") for r in found["skipped"].values()}
        summary["status"] = "skipped" if found["skipped"] else "not run"
        summary["reason"] = "; ".join(sorted(r for r in reasons if r)) or f"no evaluate outputs under {runs / model}"
        return summary
    summary["status"] = "ran"
    folder = out / model
    (folder / "figures").mkdir(parents=True)
    scores = found["scores"]
    measured = scores[~scores["extra_seed"]]
    printed = [b for b in dict.fromkeys(numbers.loc[numbers["table"] == table, "benchmark"]) if b != paper.AVG] if table else []
    measured_benchmarks = set(measured["benchmark"])
    avg_over = [b for b in printed if b in measured_benchmarks] if printed else sorted(measured_benchmarks)
    cells = paper.compare(measured[["method", "keep", "benchmark", "value"]], table, numbers, avg_over=avg_over)
    _paper.noted(cells, note).to_csv(folder / "cells.csv", index=False)
    table_frame = paper.wide(cells)
    shown = paper.readable(cells, metrics_of, paper.unpruned_keep(table, numbers))
    if flags:
        table_frame.insert(0, "fusion", [flags.get(m, ("", "", ""))[2] for _, m in table_frame.index])
        for i, column in enumerate(("sensitivity", "diversity")):
            table_frame.insert(i, column, [flags.get(m, ("", "", ""))[i] for _, m in table_frame.index])
        for i, column in enumerate(("Sensitivity", "Diversity", "Fusion")):
            shown.insert(2 + i, column, [flags.get(m, ("", "", ""))[i] for m in shown["method"]])
    _paper.noted(table_frame, note).to_csv(folder / "table.csv")
    title = f"{model}: the paper's {table.replace('table', 'Table ')}" if table else f"{model}: no table of the paper reports it"
    over = f" Avg measured over {', '.join(avg_over)}" + (f"; the paper's over {', '.join(printed)}." if printed else ".")
    lines = ([f"**{note}**", ""] if note else []) + [f"### {title}", "", paper.LEGEND + over, ""]
    sizes = json.loads((runs / model / UNPRUNED / "run.json").read_text()).get("questions", {}) \
        if (runs / model / UNPRUNED / "run.json").exists() else {}
    if sizes:
        lines += [f"Questions per task (per-question table): {', '.join(f'{t} {n}' for t, n in sorted(sizes.items()))}.", ""]
    lines += [stats.markdown_frame(shown)]
    problems = [f"- `{r}`: skipped ({found['skipped'][r].get('reason')})" for r in found["skipped"]]
    problems += [f"- `{r}`: missing (no output folder; not run yet)" for r in found["missing"]]
    problems += [f"- `{r}`: {why}" for r, why in found["failed"].items()]
    if problems:
        lines += ["", "Entries not in the table:", "", *problems]
    notes = params["paper"].get("task_notes", {})
    used = sorted(set(measured["task"]))
    task_notes = [f"- `{t}`: {notes[t]}" for t in used if t in notes]
    task_notes += [f"- `{t}`: {notes[t.removesuffix('_standin')]}" for t in used
                   if t not in notes and t.removesuffix("_standin") in notes]
    if task_notes:
        lines += ["", "Where a task differs from what the paper ran:", "", *task_notes]
    if found["ignored"]:
        lines += ["", f"Tasks with no paper column (params paper.benchmarks), left out: {sorted(found['ignored'])}."]
    (folder / "table.md").write_text("\n".join(lines) + "\n")

    avg = cells[cells["benchmark"] == paper.AVG]
    metrics = {}
    for r in avg.itertuples():
        if r.method == UNPRUNED:
            continue
        metrics |= {f"{model}/avg/{r.method}-{r.keep}": r.measured, f"{model}/avg_paper/{r.method}-{r.keep}": r.paper,
                    f"{model}/avg_difference/{r.method}-{r.keep}": r.difference}

    # paired statistics on the per-question tables
    have = [n for n in found["present"] if n in main and (runs / model / n / "samples.csv").exists()]
    samples = stats.read_samples(runs / model, have)
    columns = {t: paper.benchmark_of(t, params) for t in set(samples["task"]) if t not in found["ignored"]}
    samples = samples[samples["task"].isin(columns)].assign(task=lambda d: d["task"].map(columns))
    # one per-question measure per benchmark (MME's rows name perception or cognition): F1 of 'yes' or the fraction right
    samples["metric"] = samples["metric"].where(samples["metric"] == "f1", "accuracy")
    options = {k: params["results"][k] for k in ("confidence", "resamples", "seed")}
    paired = paired_statistics(samples, methods, budgets, reference if reference in methods else None,
                               pair if pair and all(m in methods for m in pair) else None, options)
    n_text = paired["note"]
    if "benchmarks" in paired:
        left = sorted(set(measured["benchmark"]) - set(paired["benchmarks"]))
        n_text += f" Not covered (their runs record no 0/1 outcome per question): {', '.join(left)}." if left else ""
    if "bootstrap" in paired:
        covered = {b: samples.loc[samples["task"] == b, "metric"].iloc[0] for b in paired["benchmarks"]}
        _paper.noted(paired["bootstrap"], note).to_csv(folder / "bootstrap.csv", index=False)
        _paper.noted(paired["comparisons"], note).to_csv(folder / "comparisons.csv", index=False)
        (folder / "comparisons.md").write_text(
            f"### {model}: paired differences\n\nMethod minus `unpruned` or `{reference}` at the same budget, percentage "
            f"points; * = the interval excludes 0. {n_text}\n\n"
            + stats.markdown_frame(readable_comparisons(paired["comparisons"], covered)))
        if "mcnemar" in paired:
            data, shown_m = paired["mcnemar"]
            _paper.noted(data, note).to_csv(folder / "mcnemar.csv", index=False)
            (folder / "mcnemar.md").write_text(
                f"### {model}: `{pair[0]}` against `{pair[1]}`\n\nMcNemar's exact test on the questions exactly one of "
                f"them answers right. {n_text}\n\n" + stats.markdown_frame(shown_m))
            metrics |= {f"{model}/significant/{pair[0]}_vs_{pair[1]}/{r.task}-{r.tokens}": bool(r.significant)
                        for r in data.itertuples()}
        if reference in methods and (paired["comparisons"]["versus"] == reference).any():
            figures.save(figures.differences(paired["comparisons"], reference, note, questions=model),
                         folder / "figures" / "differences.png")
    else:
        (folder / "comparisons.md").write_text(f"### {model}: paired differences\n\n{n_text}.\n")

    # seeds: every benchmark's score over the main run's seed and paper.seeds (scores, so all benchmarks)
    seeded = scores[scores["method"].isin([m for m in methods if method_class(m).stochastic()])]
    if len(seeded) and seeds:
        base = measured[measured["method"] == UNPRUNED].set_index("benchmark")["value"].to_dict()
        frame = seeded.assign(task=seeded["benchmark"], score=seeded["value"])[["method", "keep", "seed", "task", "score"]]
        spread = stats.score_spread(frame)
        spread = spread[spread["task"] != "Mean"]
        if base and avg_over:
            over = stats.score_spread(frame[frame["task"].isin(avg_over)], {b: base.get(b) for b in avg_over})
            spread = pd.concat([spread, over[over["task"] == "Avg"].assign(mean=lambda d: 100 * d["mean"], sd=lambda d: 100 * d["sd"],
                                                                            min=lambda d: 100 * d["min"], max=lambda d: 100 * d["max"])])
        _paper.noted(spread, note).to_csv(folder / "seeds.csv", index=False)
        shown_s = pd.DataFrame({"tokens": spread["keep"].map(stats.keep_label), "method": spread["method"],
                                "benchmark": spread["task"].replace({"Avg": "Avg (% of unpruned)"}), "seeds": spread["seeds"],
                                "mean +- sd": [f"{m:.2f} +- {sd:.2f}" for m, sd in zip(spread["mean"], spread["sd"])],
                                "min - max": [f"{lo:.2f} - {hi:.2f}" for lo, hi in zip(spread["min"], spread["max"])]})
        (folder / "seeds.md").write_text(
            f"### {model}: spread over seeds\n\nThe stochastic methods at the main run's seed and params paper.seeds "
            f"{list(seeds)}, in the paper's units.\n\n"
            + (stats.markdown_frame(shown_s) if len(shown_s) else "No method has more than one seed here.\n"))

    figures.save(figures.paper_avg({title: avg}, note), folder / "figures" / "avg_vs_budget.png")
    summary |= {"metrics": metrics, "avg": avg, "title": title}
    return summary


def summary_lines(summaries: list[dict], what: str) -> list[str]:
    """The summary page's lines: which model fills which table, which ran, which were skipped and why."""
    lines = [f"| model | the paper's table | status | entries present | not in the table |", "|---|---|---|---|---|"]
    for m in sorted(summaries, key=lambda m: (m["table"] is None, m["table"] or "")):
        absent = len(m["missing"]) + len(m["failed"]) + len(m["skipped"])
        table = m["table"].replace("table", "Table ") if m["table"] else "none"
        status = m["status"] + (f": {m['reason']}" if m.get("reason") else "")
        lines.append(f"| {m['model']} | {table} | {status} | {len(m['present'])} | {absent} |")
    out = [f"## {what}", "", *lines, ""]
    for status, label in (("skipped", "Skipped models"), ("not run", "Models not run yet")):
        named = [m for m in summaries if m["status"] == status]
        if named:
            out += [f"{label}: " + "; ".join(f"**{m['model']}** ({m['reason']})" for m in named) + ".", ""]
    return out


def paper_main(argv) -> None:
    """Tables 1-4 (``--params`` of the paper profile): one table per model of ``paper.models``."""
    from analysis import paper

    from . import _paper
    from .plan import methods_of

    args = paper_parser("results").parse_args(argv)
    with stage("results", args, ["paper", "results"], ["out"]) as s:
        res = s.params["results"]
        numbers = paper.paper_numbers()
        runs = Path(args.runs)
        records = checkpoint_records(s.params, runs.parent / "checkpoints")
        note = _paper.weights_note(records.values())
        out = s.out["out"]
        out.mkdir(parents=True)
        summaries = []
        for model in s.params["paper"]["models"]:
            methods = methods_of(s.params, model, ablation=False)
            own = _paper.weights_note(records[model])  # this model's own stand-in note (figures, tables)
            summaries.append(model_tables(s, model, runs, out, methods, paper.table_of(model, numbers), numbers, own,
                                          seeds=s.params["paper"]["seeds"], reference=res["reference"], pair=res["mcnemar"]))
        ran = [m for m in summaries if m["status"] == "ran"]
        if ran:
            figures.save(figures.paper_avg({m["title"]: m["avg"] for m in ran}, note), out / "figures" / "avg_vs_budget.png")
        lines = ([f"**{note}**", ""] if note else []) + summary_lines(summaries, "Tables 1-4: one per model")
        (out / "summary.md").write_text("\n".join(lines))
        metrics = {k: v for m in ran for k, v in m["metrics"].items()}
        metrics |= {f"status/{m['model']}": m["status"] for m in summaries}
        metrics |= {f"reason/{m['model']}": m["reason"] for m in summaries if m.get("reason")}
        metrics |= {f"missing/{m['model']}": [*m["missing"], *m["failed"], *m["skipped"]] for m in ran
                    if m["missing"] or m["failed"] or m["skipped"]}
        metrics["rehearsal"] = bool(note)
        write_json(out / "metrics.json", metrics)
        s.log(metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
              images={p.stem: p for p in sorted(out.glob("**/figures/*.png"))})


if __name__ == "__main__":
    main()
