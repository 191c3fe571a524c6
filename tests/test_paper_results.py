"""The paper profile's results, ablation and report stages on an evaluate tree written by hand
(tests/paper_helpers.py): Avg by hand, the paper's numbers read straight from the CSV, the difference,
which table is which, skipped and missing entries named, paired statistics and seeds counted by hand,
the RANDOM-WEIGHT REHEARSAL note on every page and on every figure."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from paper_helpers import GQA, OTHER, SKIP_REASON, fake_stage_outputs, make_paper_outputs, tables_of
from pipeline import report, results

CSV = Path(__file__).resolve().parent.parent / "analysis" / "paper_numbers.csv"
BANNER = "RANDOM-WEIGHT REHEARSAL"


def published(table, method, keep, benchmark):
    """The paper's number of one cell, read from the CSV with the csv module (not analysis.paper)."""
    with open(CSV, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["table"] == table and r["method"] == method
                and r["benchmark"] == benchmark and float(r["keep"] or "nan") == float(keep)]
    assert len(rows) == 1, (table, method, keep, benchmark)
    return (float(rows[0]["value"]) if rows[0]["value"] else float("nan")), rows[0]["source"]


def tables_of_models():
    with open(CSV, newline="") as handle:
        return {(r["model"], r["table"]) for r in csv.DictReader(handle) if r["table"] in ("table1", "table2", "table3", "table4")}


def hand_scores(method):
    """The paper-unit scores of a hand-made run: GQA accuracy and POPE F1 in %, MMBench as is, MME summed."""
    mmbench, (perception, cognition), pope = OTHER[method]
    return {"gqa": 100 * np.mean(GQA[method]), "mmbench": mmbench, "mme": perception + cognition, "pope": 100 * pope}


def hand_avg(method):
    mine, base = hand_scores(method), hand_scores("unpruned")
    return 100 * np.mean([mine[b] / base[b] for b in mine])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    tables_of(root, make_paper_outputs(root))
    return root


def cells(root, stage, model):
    data = pd.read_csv(root / "outputs" / stage / model / "cells.csv", keep_default_na=False,
                       na_values=[""], dtype={"source": str})
    return {(m, float(k), b): row for m, k, b, row in zip(data["method"], data["keep"], data["benchmark"],
                                                           data.itertuples(index=False))}


def test_each_model_fills_the_table_the_csv_gives_it(workspace):
    text = (workspace / "outputs" / "results" / "summary.md").read_text()
    for model, table in tables_of_models():
        assert f"| {model} | Table {table[-1]} |" in text
    lines = (workspace / "outputs" / "results" / "qwen2.5-vl-7b" / "table.md").read_text().splitlines()
    assert lines[0].startswith(f"**{BANNER}: qwen2.5-vl-7b is a random-weight stand-in") and lines[2] == \
        "### qwen2.5-vl-7b: the paper's Table 4"


def test_scores_in_the_papers_units_avg_and_the_difference_by_hand(workspace):
    found = cells(workspace, "results", "llava-1.5-7b")
    for method, keep in (("zoo", 64), ("zoo", 192), ("divprune", 64), ("sparsevlm", 192)):
        for benchmark, value in hand_scores(method).items():
            cell = found[(method, keep, benchmark)]
            paper, source = published("table1", method, keep, benchmark)
            assert cell.measured == pytest.approx(value)
            assert cell.paper == pytest.approx(paper) and cell.difference == pytest.approx(value - paper)
            assert cell.source == source
        avg = found[(method, keep, "avg")]
        paper, _ = published("table1", method, keep, "avg")
        assert avg.measured == pytest.approx(hand_avg(method)) and avg.difference == pytest.approx(hand_avg(method) - paper)
    assert found[("unpruned", 576, "avg")].measured == pytest.approx(100)
    # Qwen2.5-VL: budgets as ratios, Table 4's blanks stay blank (no difference)
    qwen = cells(workspace, "results", "qwen2.5-vl-7b")
    assert qwen[("divprune", 0.2, "mme")].paper == pytest.approx(published("table4", "divprune", 0.2, "mme")[0])
    assert np.isnan(qwen[("divprune", 0.2, "gqa")].paper) and np.isnan(qwen[("divprune", 0.2, "gqa")].difference)
    assert qwen[("zoo", 0.2, "avg")].measured == pytest.approx(hand_avg("zoo"))
    table = (workspace / "outputs" / "results" / "llava-1.5-7b" / "table.md").read_text()
    paper, _ = published("table1", "zoo", 64, "gqa")
    assert f"| 64 | zoo | 88.9 | 50.00 ({paper:.2f}; {50 - paper:+.2f}) |" in table
    assert f"({published('table1', 'sparsevlm', 192, 'gqa')[0]:.2f}†;" in table  # SparseVLM's cells: the paper's copies


def test_skipped_model_and_missing_entry_are_named(workspace):
    out = workspace / "outputs" / "results"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status/llava-1.5-13b"] == "skipped" and metrics["reason/llava-1.5-13b"] == SKIP_REASON
    assert not (out / "llava-1.5-13b").exists()
    assert f"Skipped models: **llava-1.5-13b** ({SKIP_REASON})." in (out / "summary.md").read_text()
    assert metrics["missing/llava-1.5-7b"] == ["divprune-192"]
    assert "- `divprune-192`: missing" in (out / "llava-1.5-7b" / "table.md").read_text()
    assert ("divprune", 192, "avg") not in cells(workspace, "results", "llava-1.5-7b")


def test_paired_statistics_and_seeds_by_hand(workspace):
    out = workspace / "outputs" / "results" / "llava-1.5-7b"
    mcnemar = pd.read_csv(out / "mcnemar.csv").set_index("tokens")
    zoo, divprune = np.array(GQA["zoo"]), np.array(GQA["divprune"])
    assert mcnemar.loc[64, "only zoo correct"] == int(((zoo == 1) & (divprune == 0)).sum())
    assert mcnemar.loc[64, "only divprune correct"] == int(((zoo == 0) & (divprune == 1)).sum())
    assert list(mcnemar["task"]) == ["gqa"]  # the only benchmark here with a 0/1 outcome per question
    comparisons = pd.read_csv(out / "comparisons.csv")
    row = comparisons[(comparisons["method"] == "zoo") & (comparisons["keep"] == 64) & (comparisons["versus"] == "divprune")
                      & (comparisons["measure"] == "gqa")]
    assert row["value"].item() == pytest.approx(zoo.mean() - divprune.mean())
    seeds = pd.read_csv(out / "seeds.csv")
    gqa = seeds[(seeds["keep"] == 64) & (seeds["task"] == "gqa")].iloc[0]
    draws = [100 * zoo.mean(), 100.0]  # seed 0 (the main run) and seed 1 (all right)
    assert gqa["seeds"] == 2 and gqa["mean"] == pytest.approx(np.mean(draws)) and gqa["sd"] == pytest.approx(np.std(draws, ddof=1))


def test_ablation_is_table_5_with_its_flags(workspace):
    found = cells(workspace, "ablation", "llava-next-7b")
    for variant in ("sensitivity_only", "divprune", "sum_fusion", "zoo"):
        paper, _ = published("table5", variant, 160, "mme")
        assert found[(variant, 160, "mme")].paper == pytest.approx(paper)
        assert found[(variant, 160, "avg")].measured == pytest.approx(hand_avg(variant))
    table = (workspace / "outputs" / "ablation" / "llava-next-7b" / "table.md").read_text()
    assert "| 160 | sum_fusion | yes | yes | sum | 94.4 |" in table
    assert json.loads((workspace / "outputs" / "ablation" / "metrics.json").read_text())["rehearsal"] is True


def run_report(outputs: Path, params: Path, out: Path) -> None:
    report.main(["--params", str(params), "--outputs", str(outputs), "--out", str(out)])


def test_report_pages_carry_the_rehearsal_note_and_every_figure_is_stamped(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    outputs = tmp_path / "outputs"
    shutil.copytree(workspace / "outputs", outputs)
    fake_stage_outputs(outputs)
    run_report(outputs, workspace / "params.yaml", tmp_path / "report")
    pages = sorted((tmp_path / "report").glob("*.md"))
    assert {p.stem for p in pages} == {"README", "results", "ablation", "sensitivity", "proxy", "sweeps", "efficiency"}
    for page in pages:
        assert BANNER in page.read_text().splitlines()[0], page.name
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "| llava-1.5-13b | `llava-hf/llava-1.5-13b-hf` | **absent, skipped**" in readme
    assert "`proxy`: not run" in readme and "`sweep_h`: not run" in readme
    assert "*Skipped*: " + SKIP_REASON in (tmp_path / "report" / "sensitivity.md").read_text()
    proxy = (tmp_path / "report" / "proxy.md").read_text()
    assert "| Fig. 2 |  | zoo |  | mmmu | mean_spearman_rho | 0.55 | paper |" in proxy and "*Not run*" in proxy
    results_page = (tmp_path / "report" / "results.md").read_text()
    assert "### llava-1.5-7b: the paper's Table 1" in results_page and "### qwen2.5-vl-7b" in results_page
    copied = sorted((tmp_path / "report" / "figures").glob("*.png"))
    sources = {f"{p.parent.parent.relative_to(outputs).as_posix().replace('/', '_')}_{p.stem}.png": p
               for p in outputs.glob("**/figures/*.png")}
    assert {p.name for p in copied} == set(sources)
    for path in copied:
        stamped, source = imread(path), imread(sources[path.name])
        assert stamped.shape[1] == source.shape[1] and stamped.shape[0] > source.shape[0]  # a band above
        band = stamped[: stamped.shape[0] - source.shape[0], :, :3]
        red = (band[..., 0] > 0.6) & (band[..., 1] < 0.35) & (band[..., 2] < 0.45)
        assert red.sum() > 100, path.name  # the note's crimson letters
        np.testing.assert_allclose(stamped[-source.shape[0]:, :, :3], source[..., :3], atol=1 / 255)


def test_report_without_standins_copies_figures_as_they_are(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    outputs = tmp_path / "outputs"
    shutil.copytree(workspace / "outputs", outputs)
    for path in outputs.glob("checkpoints/*/checkpoint.json"):  # the same records, pointing at real-looking folders
        record = json.loads(path.read_text())
        if record["path"]:
            real = tmp_path / "real" / record["model"]
            real.mkdir(parents=True)
            record["path"] = str(real)
        path.write_text(json.dumps(record))
    run_report(outputs, workspace / "params.yaml", tmp_path / "report")
    assert not any(BANNER in p.read_text().splitlines()[0] for p in (tmp_path / "report").glob("*.md"))
    figure = tmp_path / "report" / "figures" / "results_avg_vs_budget.png"
    assert figure.read_bytes() == (outputs / "results" / "figures" / "avg_vs_budget.png").read_bytes()


def test_units_and_a_model_no_table_reports():
    from analysis import paper, stats

    lmms = {"results": {"mme": {"mme_perception_score,none": 1500.0, "mme_cognition_score,none": 300.0},
                        "mmbench_en_dev_static": {"gpt_eval_score,none": 64.7, "gpt_eval_score_stderr,none": "N/A"},
                        "gqa": {"exact_match,none": 0.619}}}
    metrics = stats.task_metrics(lmms)
    assert metrics == {"mme": "mme_perception_score+mme_cognition_score", "mmbench_en_dev_static": "gpt_eval_score",
                       "gqa": "exact_match"} and stats.task_scores(lmms)["mme"] == 1800.0
    assert paper.paper_units(0.619, metrics["gqa"], "acc") == pytest.approx(61.9)
    assert paper.paper_units(64.7, metrics["mmbench_en_dev_static"], "acc") == 64.7  # MMBench's score is in % already
    assert paper.paper_units(1800.0, metrics["mme"], "perception+cognition") == 1800.0
    assert [stats.keep_label(k) for k in (64, 0.2, 1.0, None)] == ["64", "20%", "100%", "all"]
    measured = pd.DataFrame({"method": ["unpruned", "unpruned", "zoo", "zoo"], "keep": [None, None, 8, 8],
                             "benchmark": ["gqa", "mme", "gqa", "mme"], "value": [50.0, 1000.0, 25.0, 1000.0]})
    cells = paper.compare(measured, None)  # no table of the paper: Avg over every measured benchmark, no paper cells
    avg = cells[(cells["method"] == "zoo") & (cells["benchmark"] == "avg")].iloc[0]
    assert avg["measured"] == pytest.approx(100 * (25 / 50 + 1000 / 1000) / 2) and np.isnan(avg["paper"])
    assert cells["source"].eq("").all()


def test_paired_statistics_leave_out_a_benchmark_answered_on_different_questions():
    rows = []
    for run, right in (("unpruned", [1, 1, 0, 1]), ("zoo-8", [1, 0, 0, 1])):
        for i, r in enumerate(right):
            rows.append({"run": run, "task": "gqa", "doc_id": i, "target": "a", "prediction": "a" if r else "b",
                         "correct": bool(r), "metric": "accuracy"})
            if not (run == "zoo-8" and i == 2):  # zoo-8's question 2 of vqav2 has no 0/1 outcome
                rows.append({"run": run, "task": "vqav2", "doc_id": i, "target": "a", "prediction": "a",
                             "correct": True, "metric": "accuracy"})
    samples = pd.DataFrame(rows)
    paired = results.paired_statistics(samples, ["zoo"], [8], None, None, {"confidence": 0.95, "resamples": 99, "seed": 0})
    assert paired["benchmarks"] == ["gqa"] and "on different questions (no pairing): vqav2" in paired["note"]
    own = paired["bootstrap"].query("run == 'zoo-8' and versus == '' and measure == 'gqa'")["value"].item()
    assert own == pytest.approx(0.5)
