"""The paper's published numbers (analysis/paper_numbers.csv) against the paper's text.

Spot checks: cells typed here by hand from /work/shared/paper/zoo-prune-paper.txt (Tables 1-5, App. D,
the Fig. 5 text), at least one per table, with an Avg. cell. Consistency: every Avg. the paper prints
next to complete cells is the mean of those cells relative to its table's unpruned row (the paper's
definition, App. C.3), recomputed here from the CSV: a mistyped cell would move its row's Avg.
"""

import math
from pathlib import Path

import pandas as pd
import pytest

from analysis.paper import BENCHMARKS, COLUMNS, KEY, UNPRUNED, benchmark_of, paper_numbers, paper_table
from zoo_prune import available_methods
from pipeline.schema import read
from zoo_prune.evaluation import PAPER_TASKS

PARAMS = read(Path(__file__).resolve().parent.parent / "paper" / "params.yaml")  # the paper profile (with its base)


@pytest.fixture(scope="module")
def numbers():
    return paper_numbers()


def cell(numbers, table, model, method, keep, benchmark, metric=None):
    rows = numbers[(numbers.table == table) & (numbers.model == model) & (numbers.method == method)
                   & (numbers.keep == keep) & (numbers.benchmark == benchmark)]
    if metric is not None:
        rows = rows[rows.metric == metric]
    assert len(rows) == 1, (table, model, method, keep, benchmark, len(rows))
    return rows.iloc[0]


# (table, model, method, keep, benchmark, value as printed in the paper)
SPOT = [
    ("table1", "llava-1.5-7b", "unpruned", 576, "mme", 1862.00),
    ("table1", "llava-1.5-7b", "fastv", 64, "pope", 48.00),
    ("table1", "llava-1.5-7b", "zoo", 128, "textvqa", 57.87),
    ("table1", "llava-1.5-7b", "divprune", 192, "seedbench", 58.71),
    ("table1", "llava-1.5-7b", "zoo", 64, "avg", 95.5),
    ("table2", "llava-1.5-13b", "divprune", 64, "mme", 1777.93),
    ("table2", "llava-1.5-13b", "zoo", 192, "mmmu", 37.33),
    ("table2", "llava-1.5-13b", "unpruned", 576, "seedbench", 66.90),
    ("table2", "llava-1.5-13b", "visionzip", 128, "avg", 97.0),
    ("table3", "llava-next-7b", "visionzip", 160, "pope", 74.80),
    ("table3", "llava-next-7b", "zoo", 320, "avg", 97.1),
    ("table3", "llava-next-7b", "sparsevlm", 640, "vqav2", 77.10),
    ("table3", "llava-next-7b", "unpruned", 2880, "scienceqa_img", 70.20),
    ("table4", "qwen2.5-vl-7b", "divprune", 0.1, "mme", 2054),
    ("table4", "qwen2.5-vl-7b", "unpruned", 1.0, "pope", 86.3),
    ("table4", "qwen2.5-vl-7b", "visionzip", 0.2, "mmbench", 79.72),
    ("table4", "qwen2.5-vl-7b", "zoo", 0.2, "avg", 96.2),
    ("table5", "llava-next-7b", "sum_fusion", 320, "textvqa", 56.79),
    ("table5", "llava-next-7b", "sensitivity_only", 160, "scienceqa_img", 68.82),
    ("table5", "llava-next-7b", "sensitivity_only", 640, "avg", 96.7),
    ("appD", "llava-next-7b", "unpruned", 2880, "", 11.8),
    ("appD", "llava-next-7b", "zoo", 160, "", 0.94),
    ("appD", "llava-next-7b", "divprune", 320, "", 1.41),
]


@pytest.mark.parametrize("table, model, method, keep, benchmark, value", SPOT)
def test_spot_checked_cells_match_the_paper(numbers, table, model, method, keep, benchmark, value):
    assert cell(numbers, table, model, method, keep, benchmark)["value"] == value


def test_cells_the_paper_leaves_empty_are_nan_with_a_note(numbers):
    for benchmark in ("pope", "seedbench", "avg"):  # Table 3 prints '_' / '-' for SparseVLM there
        row = cell(numbers, "table3", "llava-next-7b", "sparsevlm", 320, benchmark)
        assert math.isnan(row["value"]) and "not reported" in row["note"]
    for method, benchmark in (("visionzip", "gqa"), ("divprune", "mmbench"), ("divprune", "pope")):
        row = cell(numbers, "table4", "qwen2.5-vl-7b", method, 0.2, benchmark)
        assert math.isnan(row["value"]) and row["note"]
    assert numbers["value"].isna().sum() == 3 * 3 + 5  # nothing else is missing


def test_sparsevlm_cells_are_marked_as_copies(numbers):
    sparse = numbers[numbers.method == "sparsevlm"]
    assert len(sparse) == 3 * 10 + 3 * 10  # Table 1 and Table 3, three budgets, nine benchmarks + Avg.
    assert set(sparse["source"]) == {"copied:sparsevlm"}
    assert set(numbers[numbers.method != "sparsevlm"]["source"]) == {"paper"}
    assert sparse["note"].str.contains("SparseVLM's own published numbers").all()


def test_fig5_and_fig2_numbers_of_the_text(numbers):
    fig5 = numbers[numbers.table == "fig5"].set_index("metric")["value"]
    assert fig5.to_dict() == {"e2e_speedup": 2.30, "prefill_speedup": 2.59}
    fig2 = numbers[numbers.table == "fig2"].set_index("benchmark")["value"]
    assert fig2.to_dict() == {"mmmu": 0.55, "pope": 0.49}


def test_structure(numbers):
    assert tuple(numbers.columns) == COLUMNS
    assert not numbers.duplicated(list(KEY)).any()
    assert set(numbers.table) == {"table1", "table2", "table3", "table4", "table5", "appD", "fig2", "fig5"}
    tables = numbers[numbers.table.str.startswith("table")]
    assert tables.groupby("table").size().to_dict() == {  # (methods x budgets + unpruned) x (benchmarks + Avg.)
        "table1": (5 * 3 + 1) * 10, "table2": (3 * 3 + 1) * 10, "table3": (4 * 3 + 1) * 10, "table4": (3 * 2 + 1) * 5,
        "table5": 4 * 3 * 10}
    named = numbers[numbers.table != "fig2"]
    assert set(named.model) <= set(PARAMS["paper"]["models"])
    assert set(numbers.method) <= {UNPRUNED, "sparsevlm", *available_methods()}
    assert set(tables.benchmark) == {*BENCHMARKS, "avg"}
    assert set(tables[tables.table == "table4"].benchmark) == {"gqa", "mmbench", "mme", "pope", "avg"}
    for model, spec in PARAMS["paper"]["models"].items():  # the paper's budgets are params' budgets
        keeps = set(tables[(tables.model == model) & (tables.method != UNPRUNED)].keep)
        assert keeps == set(spec["budgets"]), model
    metrics = tables.groupby("benchmark").metric.unique().map(tuple).to_dict()
    assert metrics == {**{b: ("acc",) for b in BENCHMARKS}, "pope": ("f1",), "mme": ("perception+cognition",),
                       "avg": ("relative_percent",)}


def test_every_printed_avg_is_the_mean_relative_score_of_its_row(numbers):
    checked, off = 0, []
    for table in ("table1", "table2", "table3", "table4", "table5"):
        rows = numbers[numbers.table == table]
        base_rows = numbers[numbers.table == ("table3" if table == "table5" else table)]
        base = base_rows[(base_rows.method == UNPRUNED) & (base_rows.benchmark != "avg")].set_index("benchmark")["value"]
        for (method, keep), row in rows.groupby(["method", "keep"], sort=False):
            values = row.set_index("benchmark")["value"]
            printed, cells = values.pop("avg"), values
            if math.isnan(printed) or cells.isna().any():
                continue
            computed = 100 * sum(cells[b] / base[b] for b in cells.index) / len(cells)
            checked += 1
            if abs(computed - printed) > 0.05 + 1e-9:  # printed to one decimal
                off.append((table, method, keep, round(computed, 2), printed))
    assert checked == 16 + 10 + 10 + 5 + 12
    assert off == [("table4", "zoo", 0.2, 96.33, 96.2)]  # the paper's own slip, said in the row's note
    assert "96.3" in cell(numbers, "table4", "qwen2.5-vl-7b", "zoo", 0.2, "avg")["note"]


def test_table5_shares_its_divprune_and_zoo_rows_with_table3(numbers):
    t3, t5 = paper_table("table3", numbers), paper_table("table5", numbers)
    for method in ("divprune", "zoo"):
        pd.testing.assert_frame_equal(t5.loc[[method]], t3.loc[[method]])
    assert t3.loc[("zoo", 160), "gqa"] == 59.93 and list(t3.columns) == [*BENCHMARKS, "avg"]
    assert list(t3.index[:2]) == [(UNPRUNED, 2880), ("sparsevlm", 640)]


def test_loader_errors_name_the_problem(tmp_path, numbers):
    bad = tmp_path / "dup.csv"
    pd.concat([numbers.head(2), numbers.head(1)]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="duplicated keys.*table1"):
        paper_numbers(bad)
    numbers.drop(columns="note").to_csv(bad, index=False)
    with pytest.raises(ValueError, match="columns must be"):
        paper_numbers(bad)
    with pytest.raises(ValueError, match="no table 'table9'"):
        paper_table("table9", numbers)


def test_params_map_every_paper_task_to_a_column():
    paper = PARAMS["paper"]
    assert tuple(paper["tasks"]) == PAPER_TASKS
    assert set(paper["task_notes"]) <= set(paper["tasks"])
    assert [benchmark_of(task, PARAMS) for task in paper["tasks"]] == list(BENCHMARKS)
    assert benchmark_of("vqav2_val_standin", PARAMS) == "vqav2"  # a rehearsal's stand-in fills its task's column
    with pytest.raises(ValueError, match="'nope'"):
        benchmark_of("nope", PARAMS)
