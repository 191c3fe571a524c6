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

from pathlib import Path

import pandas as pd

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
