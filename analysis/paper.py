"""The paper's published numbers (``analysis/paper_numbers.csv``) as a DataFrame, for the report to join.

    from analysis.paper import paper_numbers, paper_table
    numbers = paper_numbers()                       # long form, one row per cell
    paper_table("table1")                           # Table 1 in the paper's layout (rows method x keep)

The CSV holds every cell of the paper's Tables 1-5 and the App. D FLOPs, plus the few numbers its text
gives for Fig. 2 (mean Spearman rho) and Fig. 5 (speed-ups), one row per cell:

- ``table``: table1 ... table5, appD, fig2, fig5;
- ``model``: as params.yaml ``paper.models`` names it (empty for Fig. 2: the paper names none);
- ``method``: as the ``zoo_prune`` method registry names it, ``unpruned`` for the full model
  (``sparsevlm``'s cells are copies of SparseVLM's own numbers: see ``source``);
- ``keep``: the budget as the paper states it: visual tokens (576, 192, ... ; LLaVA-NeXT 2880, 640,
  ...) or, for Qwen2.5-VL, the fraction kept (0.2, 0.1; 1.0 = "Full Tokens"), as params' budgets;
- ``benchmark``: the paper's column (gqa, mmbench, mme, pope, scienceqa_img, vqav2, textvqa, mmmu,
  seedbench; ``avg`` for Avg.; empty for App. D, which names none); params ``paper.benchmarks``
  maps each lmms-eval task to it;
- ``metric``: acc, f1, perception+cognition (MME), relative_percent (Avg.), tflops,
  e2e_speedup / prefill_speedup (Fig. 5), mean_spearman_rho (Fig. 2);
- ``value``: as printed (accuracies and Avg. in percent); empty where the paper prints none
  ('_' or '-', or a blank in Table 4), read as NaN;
- ``source``: ``paper``, or ``copied:sparsevlm`` for SparseVLM's cells, which are SparseVLM's own
  published numbers as the paper copies them (it did not run SparseVLM);
- ``note``: what else the reader should know about the cell.

Every Avg. that the paper prints next to complete cells equals the mean of those cells relative to the
same table's unpruned row, to the printed rounding, except Table 4's ZOO-Prune at 20 % (96.3 computed,
96.2 printed; said in its note). ``tests/test_paper_numbers.py`` checks this and spot-checks cells.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.stats import keep_label

PAPER_NUMBERS = Path(__file__).resolve().with_name("paper_numbers.csv")
COLUMNS = ("table", "model", "method", "keep", "benchmark", "metric", "value", "source", "note")
KEY = ("table", "model", "method", "keep", "benchmark", "metric")
TABLES = ("table1", "table2", "table3", "table4", "table5", "appD", "fig2", "fig5")
BENCHMARKS = ("gqa", "mmbench", "mme", "pope", "scienceqa_img", "vqav2", "textvqa", "mmmu", "seedbench")
UNPRUNED = "unpruned"


def _budget(text: str):
    """'192' -> 192, '0.2' -> 0.2, '' -> None: the type params.yaml gives a budget."""
    if text == "":
        return None
    number = float(text)
    return int(number) if number.is_integer() and "." not in text else number


def paper_numbers(path=PAPER_NUMBERS) -> pd.DataFrame:
    """The CSV as a DataFrame: ``value`` float (NaN where the paper prints none), ``keep`` an int
    (tokens) or float (a fraction) per row, the other columns strings. Raises ValueError naming a
    wrong column set or a duplicated key."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if tuple(frame.columns) != COLUMNS:
        raise ValueError(f"{path}: columns must be {list(COLUMNS)}, got {list(frame.columns)}")
    duplicated = frame[frame.duplicated(list(KEY), keep=False)]
    if len(duplicated):
        raise ValueError(f"{path}: duplicated keys {duplicated[list(KEY)].drop_duplicates().values.tolist()}")
    frame["keep"] = pd.Series([_budget(text) for text in frame["keep"]], index=frame.index, dtype=object)
    frame["value"] = pd.to_numeric(frame["value"].replace("", float("nan")), errors="raise")
    return frame


def paper_table(table: str, numbers: pd.DataFrame | None = None) -> pd.DataFrame:
    """One of Tables 1-5 in the paper's layout: rows (method, keep) in the paper's order, columns the
    benchmarks it reports then ``avg`` (values as printed, NaN where it prints none)."""
    numbers = paper_numbers() if numbers is None else numbers
    rows = numbers[numbers["table"] == table]
    if rows.empty or not table.startswith("table"):
        raise ValueError(f"no table {table!r} in the paper numbers; choose one of {list(TABLES[:5])}")
    order = list(dict.fromkeys(zip(rows["method"], rows["keep"])))
    columns = list(dict.fromkeys(rows["benchmark"]))
    wide = rows.pivot_table(index=["method", "keep"], columns="benchmark", values="value", aggfunc="first", dropna=False)
    return wide.reindex(index=pd.MultiIndex.from_tuples(order, names=["method", "keep"]), columns=columns)


def benchmark_of(task: str, params: dict) -> str:
    """The paper's column (``benchmark``) that lmms-eval ``task`` fills, from params ``paper.benchmarks``;
    a rehearsal's stand-in ``<task>_standin`` (``zoo_prune.rehearsal.tasks``) fills its task's column."""
    from zoo_prune.rehearsal.tasks import SUFFIX

    mapping = params.get("paper", {}).get("benchmarks", {})
    name = task if task in mapping else task.removesuffix(SUFFIX)
    if name not in mapping:
        raise ValueError(f"task {task!r} has no paper column in params paper.benchmarks ({sorted(mapping)})")
    return mapping[name]


# ---------------------------------------------------------------- measured beside published

MAIN_TABLES = ("table1", "table2", "table3", "table4")  # one per model (the CSV's model column says which)
ABLATION_TABLE = "table5"
AVG = "avg"
PERCENT_METRICS = ("gpt_eval_score",)  # lmms-eval metrics that are percentages already (MMBench's); others are fractions
POINT_METRICS = ("perception+cognition",)  # the paper's metrics printed in points (MME): scores as they are
COPIED = "copied:"  # ``source`` prefix of cells the paper copies from another paper (SparseVLM's)


def table_of(model: str, numbers: pd.DataFrame | None = None, tables=MAIN_TABLES) -> str | None:
    """The paper's table among ``tables`` that reports ``model`` (the CSV's ``table`` and ``model`` columns),
    None when it reports none; raises ValueError when the CSV gives it two."""
    numbers = paper_numbers() if numbers is None else numbers
    found = sorted(set(numbers.loc[(numbers["model"] == model) & numbers["table"].isin(tables), "table"]))
    if len(found) > 1:
        raise ValueError(f"model {model!r} has several of the paper's tables {found} among {list(tables)}")
    return found[0] if found else None


def benchmark_metrics(numbers: pd.DataFrame | None = None) -> dict[str, str]:
    """``{benchmark: the paper's metric}`` of Tables 1-5 (acc, f1, perception+cognition)."""
    numbers = paper_numbers() if numbers is None else numbers
    rows = numbers[numbers["table"].str.startswith("table") & (numbers["benchmark"] != AVG)]
    return dict(rows.drop_duplicates("benchmark")[["benchmark", "metric"]].values)


def paper_units(score: float, lmms_metric: str, paper_metric: str) -> float:
    """A measured lmms-eval score in the unit the paper prints its column in: accuracy and F1 in percent
    (lmms-eval reports fractions, except ``PERCENT_METRICS``), MME's perception + cognition in points."""
    if paper_metric in POINT_METRICS or lmms_metric in PERCENT_METRICS:
        return float(score)
    return 100 * float(score)


def unpruned_keep(table: str | None, numbers: pd.DataFrame | None = None):
    """The token count (or ratio 1.0) the paper states for the unpruned row of ``table``, or of its model's
    Tables 1-4 when ``table`` prints none (Table 5); None when unknown."""
    if table is None:
        return None
    numbers = paper_numbers() if numbers is None else numbers
    rows = numbers[numbers["table"] == table]
    keeps = rows.loc[rows["method"] == UNPRUNED, "keep"]
    if len(keeps):
        return keeps.iloc[0]
    main = table_of(rows["model"].iloc[0], numbers) if len(rows) and table not in MAIN_TABLES else None
    return unpruned_keep(main, numbers) if main else None


def compare(measured: pd.DataFrame, table: str | None, numbers: pd.DataFrame | None = None,
            avg_over: list[str] | None = None, unmeasured: bool = False) -> pd.DataFrame:
    """Measured cells beside the paper's: long form, one row per (method, keep, benchmark) and each row's
    ``avg``: columns method, keep, benchmark, measured, relative (score / unpruned score, in %), paper,
    difference (measured - paper), source (``paper``, ``copied:sparsevlm``; empty where the paper prints
    nothing).

    ``measured``: long form (method, keep, benchmark, value) in the paper's units (:func:`paper_units`), the
    unpruned run's rows with method ``unpruned`` (its keep is ignored: the table's unpruned keep is written).
    ``avg`` = 100 x mean over ``avg_over`` (default: the benchmarks the paper's ``table`` reports that were
    measured; all measured ones when the paper has no table) of score / unpruned score (method.md section 6);
    NaN when a row or the unpruned run lacks one of them. A measured row the paper does not print has paper NaN;
    a row of the paper's table that was not measured appears (measured NaN) only when ``unmeasured``.

    Rows: unpruned, then the budgets largest first; within a budget the methods the paper does not print
    (controls such as random, pooling) first, then the paper's row order (ZOO-Prune last)."""
    numbers = paper_numbers() if numbers is None else numbers
    missing = {"method", "keep", "benchmark", "value"} - set(measured.columns)
    if missing:
        raise ValueError(f"measured needs columns method, keep, benchmark, value; missing {sorted(missing)}")
    published = numbers[numbers["table"] == table] if table else numbers.iloc[:0]
    base_keep = unpruned_keep(table, numbers)
    measured = measured.copy()
    measured["keep"] = pd.Series([base_keep if m == UNPRUNED else k for m, k in zip(measured["method"], measured["keep"])],
                                 index=measured.index, dtype=object)
    rows = list(dict.fromkeys(zip(measured["method"], measured["keep"])))
    if unmeasured:
        rows += [r for r in dict.fromkeys(zip(published["method"], published["keep"])) if r not in rows]
    printed = {m: i for i, m in enumerate(dict.fromkeys(published["method"]))}
    first = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in rows))}
    rows.sort(key=lambda r: (r[0] != UNPRUNED, -float(r[1]) if r[0] != UNPRUNED else 0,
                             (1, printed[r[0]]) if r[0] in printed else (0, first[r[0]])))
    benchmarks = [b for b in BENCHMARKS if b in set(measured["benchmark"])]
    benchmarks += [b for b in dict.fromkeys(measured["benchmark"]) if b not in benchmarks]
    shown = [b for b in dict.fromkeys(published["benchmark"]) if b != AVG]
    if avg_over is None:
        avg_over = [b for b in shown if b in benchmarks] if shown else benchmarks
    value = {(m, k, b): v for m, k, b, v in measured[["method", "keep", "benchmark", "value"]].itertuples(index=False)}
    base = {b: v for (m, _, b), v in value.items() if m == UNPRUNED}
    paper = {(m, k, b): (v, s) for m, k, b, v, s in published[["method", "keep", "benchmark", "value", "source"]]
             .itertuples(index=False)}
    records = []
    for method, keep in rows:
        relative = {}
        for benchmark in benchmarks:
            v = value.get((method, keep, benchmark), math.nan)
            b = base.get(benchmark, math.nan)
            relative[benchmark] = 100 * v / b if b and not math.isnan(b) else math.nan
            p, source = paper.get((method, keep, benchmark), (math.nan, ""))
            records.append({"method": method, "keep": keep, "benchmark": benchmark, "measured": v,
                            "relative": relative[benchmark], "paper": p, "difference": v - p,
                            "source": source if not math.isnan(p) else ""})
        avg = float(np.mean([relative[b] for b in avg_over])) if avg_over else math.nan
        p, source = paper.get((method, keep, AVG), (math.nan, ""))
        records.append({"method": method, "keep": keep, "benchmark": AVG, "measured": avg, "relative": avg,
                        "paper": p, "difference": avg - p, "source": source if not math.isnan(p) else ""})
    cells = pd.DataFrame(records, columns=["method", "keep", "benchmark", "measured", "relative", "paper",
                                           "difference", "source"])
    cells["keep"] = pd.Series([r["keep"] for r in records], dtype=object)  # 64 stays 64, 0.2 stays 0.2
    return cells


def wide(cells: pd.DataFrame) -> pd.DataFrame:
    """:func:`compare`'s cells as the paper's table: rows (keep, method) in their order, per benchmark the
    columns ``<b>``, ``<b> paper``, ``<b> difference``, ``<b> relative`` (``avg``: its three)."""
    order = list(dict.fromkeys(zip(cells["keep"], cells["method"])))
    out = pd.DataFrame(index=pd.MultiIndex.from_tuples(order, names=["keep", "method"]))
    indexed = cells.set_index(["keep", "method", "benchmark"])
    for benchmark in dict.fromkeys(cells["benchmark"]):
        part = indexed.xs(benchmark, level="benchmark")
        names = {"measured": benchmark, "paper": f"{benchmark} paper", "difference": f"{benchmark} difference"}
        if benchmark != AVG:
            names["relative"] = f"{benchmark} relative"
        for column, name in names.items():
            out[name] = part[column].reindex(out.index).to_numpy()
    return out


def _number(value, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def readable(cells: pd.DataFrame, metrics: dict[str, str] | None = None, unpruned_tokens=None) -> pd.DataFrame:
    """The comparison for the eye: per benchmark ``measured (paper; difference)``, the paper's numbers as it
    prints them, ``†`` on cells it copies from another paper (SparseVLM's), ``—`` where a value is absent;
    Avg in % of unpruned. ``metrics`` ({benchmark: acc | f1 | perception+cognition}) label the headers."""
    metrics = metrics or benchmark_metrics()
    order = list(dict.fromkeys(zip(cells["keep"], cells["method"])))
    indexed = {(k, m, b): row for k, m, b, row in zip(cells["keep"], cells["method"], cells["benchmark"],
                                                       cells.itertuples(index=False))}
    benchmarks = list(dict.fromkeys(cells["benchmark"]))
    rows = []
    for keep, method in order:
        total = unpruned_tokens if unpruned_tokens else None
        pruned = ("" if method == UNPRUNED or keep is None or (isinstance(keep, float) and math.isnan(keep)) else
                  f"{100 * (1 - keep):.1f}" if float(keep) < 1 else f"{100 * (1 - keep / total):.1f}" if total else "")
        row = {"tokens": keep_label(keep), "method": method, "pruned %": pruned if method != UNPRUNED else "0.0"}
        for benchmark in benchmarks:
            cell = indexed.get((keep, method, benchmark))
            digits = 1 if benchmark == AVG else 2
            if cell is None:
                text = "—"
            else:
                mark = "†" if str(cell.source).startswith(COPIED) else ""
                paper = "—" if math.isnan(cell.paper) else f"{_number(cell.paper, digits)}{mark}"
                diff = "" if math.isnan(cell.difference) else f"; {cell.difference:+.{digits}f}"
                text = f"{_number(cell.measured, digits)} ({paper}{diff})"
            label = "Avg (% of unpruned)" if benchmark == AVG else f"{benchmark} ({metrics.get(benchmark, '?')})"
            row[label] = text
        rows.append(row)
    return pd.DataFrame(rows)


LEGEND = ("Each cell: measured (the paper's number; measured - paper). † = a number the paper copies from "
          "SparseVLM's own paper (it did not run SparseVLM). — = not measured / not printed (an Avg also where the "
          "unpruned model scores 0 on a benchmark: no ratio). Accuracy and F1 in %, "
          "MME in points (perception + cognition); Avg = mean over the paper's benchmarks of this table of score / "
          "unpruned score (method.md section 6), in %.")


WHERE = {"fig2": "Fig. 2", "fig5": "Fig. 5", "appD": "App. D"}


def published(tables, numbers: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's numbers of ``tables`` (e.g. ``("fig5", "appD")``) for a reader: where, model, method, tokens,
    benchmark, metric, value (as printed), source."""
    numbers = paper_numbers() if numbers is None else numbers
    rows = numbers[numbers["table"].isin(list(tables))]
    return pd.DataFrame({"where": rows["table"].map(lambda t: WHERE.get(t, t.replace("table", "Table "))),
                         "model": rows["model"], "method": rows["method"],
                         "tokens": [keep_label(k) if k is not None else "" for k in rows["keep"]],
                         "benchmark": rows["benchmark"], "metric": rows["metric"],
                         "value": rows["value"].map(lambda v: f"{v:g}"), "source": rows["source"]}).reset_index(drop=True)
