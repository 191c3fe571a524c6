"""The paper profile's sweep and efficiency stages on random-weight stand-ins (zoo_prune.rehearsal), in a
params folder of their own (a copy of the root params as the base, an overlay like rehearsal/params.yaml,
its plan written by pipeline.plan), plus the timing helper they rest on.

Independent references: the sweep's rows are checked against each point's own lmms-eval results file
(the settings it ran with, its F1); the speed-ups against the medians in the same CSV; the App. D
ledger against the layer formula worked by hand and the paper's numbers read from the CSV with the csv
module; CUDA synchronisation against a recording stand-in of ``torch.cuda.synchronize``.
"""

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from pipeline_helpers import ROOT, paper_params

from pipeline import efficiency, plan, sweep
from zoo_prune import timing


def profile(folder: Path, standins: Path, **paper) -> Path:
    """A paper-profile folder on LLaVA-1.5-7B's and LLaVA-NeXT-7B's stand-ins (``pipeline_helpers.paper_params``,
    the rehearsal's settings) with a base of its own: the repository's params.yaml with shorter sweeps."""
    params = paper_params(folder, standins, models=["llava-1.5-7b", "llava-next-7b"],
                          **{"ablation": {"model": "llava-1.5-7b"}, "sweep": {"limit": 2},
                             "efficiency": {"samples": 1, "new_tokens": 2}, **paper})
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["sweep"].update(h=[0.001, 0.1], m=[4, 8])
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    raw = yaml.safe_load(params.read_text())
    raw["base"] = "base.yaml"
    # the paper's lowrank on LLaVA-NeXT would have the App. D ledger take a real SVD of a 4096 x 4096 layer (~10-60 s)
    raw["paper"]["models"]["llava-next-7b"].pop("estimator", None)
    raw["paper"]["models"]["llava-next-7b"]["methods"] = ["zoo", "divprune", "fastv"]  # one of each kind here
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    plan.write(params)
    return params


def paper_csv(table: str) -> list[dict]:
    with open(ROOT / "analysis" / "paper_numbers.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["table"] == table]


def test_sweep_runs_every_point_in_one_lmms_eval_process_with_its_own_settings(paper_standins, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    params = profile(tmp_path, paper_standins)
    out = tmp_path / "outputs" / "sweep_m"
    sweep.main(["--over", "m", "--params", str(params), "--out", str(out)])
    data = pd.read_csv(out / "sweep.csv")
    assert data["m"].tolist() == [4, 8] and (data["questions"] == 2).all()
    assert data["note"].str.startswith("RANDOM-WEIGHT REHEARSAL: llava-1.5-7b").all()
    runs = yaml.safe_load((out / "lmms_eval_runs.yaml").read_text())  # one process: one list of runs, one log
    assert [Path(r["output_path"]).name for r in runs] == ["m=4", "m=8", "closed_form"]
    assert (out / "lmms_eval.log").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    points = [(f"m={m}", s) for m, s in zip(data["m"], data["score"])] + [("closed_form", metrics["score/closed_form"])]
    for point, score in points:
        [results] = (out / point).glob("*/*_results.json")
        lmms = json.loads(results.read_text())
        args = dict(a.split("=", 1) for a in lmms["config"]["model_args"].split(","))
        assert args["method"] == "zoo" and args["keep"] == "64" and args["dtype"] == "float32"
        assert args["h"] == "0.01" and args["resume_cache"] == str(tmp_path / "cache" / "lmms")
        if point == "closed_form":
            assert args["estimator"] == "closed_form"
        else:
            assert args["m"] == point.split("=")[1] and args["estimator"] == "auto"
        assert score == lmms["results"]["pope_standin"]["pope_f1_score,none"]
    assert metrics["keep"] == 64 and "no values in analysis/paper_numbers.csv" in metrics["paper_fig4"]
    assert (out / "figures" / "sweep_m.png").is_file() and not (tmp_path / "outputs" / ".tmp").exists()


def test_efficiency_times_every_planned_method_and_counts_app_d(paper_standins, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    params = profile(tmp_path, paper_standins)
    out = tmp_path / "outputs" / "efficiency"
    efficiency.main(["--params", str(params), "--out", str(out)])
    data = pd.read_csv(out / "efficiency.csv")
    assert sorted(zip(data["method"], data["keep"].fillna(0))) == [("divprune", 160), ("fastv", 160), ("unpruned", 0),
                                                                  ("zoo", 160)]
    base = data[data["method"] == "unpruned"].iloc[0]
    for kind in ("prefill", "e2e"):
        assert (data[f"{kind}_min_ms"] <= data[f"{kind}_ms"]).all()
        assert (data[f"{kind}_ms"] <= data[f"{kind}_max_ms"]).all()
        assert data[f"{kind}_speedup"].tolist() == pytest.approx((base[f"{kind}_ms"] / data[f"{kind}_ms"]).tolist())
    assert data["flop_ratio"].tolist() == pytest.approx((base["gflops"] / data["gflops"]).tolist())
    by = data.set_index("method")
    # the method's own work apart from the language model's: sensitivity only where it is computed
    assert by.loc["zoo", "sensitivity_ms"] > 0
    assert by.loc[["divprune", "fastv", "unpruned"], "sensitivity_ms"].eq(0).all()
    assert by.loc[["zoo", "divprune", "fastv"], "selection_ms"].gt(0).all() and by.loc["unpruned", "selection_ms"] == 0
    assert by["llm_ms"].gt(0).all() and by["peak_memory_mib"].isna().all()  # CPU: no allocator peak, said so
    assert by.loc["zoo", "gflops_sensitivity"] > 0 and by.loc["unpruned", "gflops_llm"] > by.loc["zoo", "gflops_llm"]
    fig5 = {(r["method"], int(r["keep"]), r["metric"]): float(r["value"]) for r in paper_csv("fig5")
            if r["model"] == "llava-next-7b"}
    assert by.loc["zoo", "paper_prefill_speedup"] == fig5[("zoo", 160, "prefill_speedup")]
    assert by.loc["zoo", "paper_e2e_speedup"] == fig5[("zoo", 160, "e2e_speedup")]
    assert math.isnan(by.loc["divprune", "paper_e2e_speedup"])
    assert data["note"].str.startswith("RANDOM-WEIGHT REHEARSAL: llava-next-7b").all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["peak_memory"].startswith("n/a") and metrics["flops_counted_on"].startswith("the loaded checkpoint")
    # App. D: the ledger on the paper's configurations, every model at its budgets, the paper's values beside
    app_d = pd.read_csv(out / "app_d.csv")
    row = app_d[(app_d.model == "llava-1.5-7b") & (app_d.method == "unpruned")].iloc[0]
    n = 576 + 60  # visual + text tokens; per layer 2 FLOPs x (4 n d^2 + 3 n d f) + 4 n^2 d (QK^T and AV)
    assert row["tflops_llm"] == pytest.approx(32 * (2 * n * (4 * 4096**2 + 3 * 4096 * 11008) + 4 * n**2 * 4096) / 1e12)
    paper = {(r["method"], int(r["keep"])): float(r["value"]) for r in paper_csv("appD")}
    next7b = app_d[app_d.model == "llava-next-7b"].set_index("method")
    assert next7b.loc["zoo", "paper_app_d"] == paper[("zoo", 160)]
    assert next7b.loc["unpruned", "paper_app_d"] == paper[("unpruned", 2880)]
    raw = yaml.safe_load(params.read_text())
    table5 = yaml.safe_load((ROOT / "params.yaml").read_text())["ablation"]["variants"]  # on paper.ablation.model here
    assert set(app_d.loc[app_d.model == "llava-1.5-7b", "method"]) == {"unpruned", *raw["paper"]["methods"], *table5}
    assert set(app_d.loc[app_d.model == "llava-next-7b", "method"]) == {"unpruned", "zoo", "divprune", "fastv"}
    assert {p.name for p in (out / "figures").glob("*.png")} == {"prefill.png", "e2e.png", "app_d_llava_1_5_7b.png",
                                                                 "app_d_llava_next_7b.png"}


def test_absent_checkpoints_are_skipped_by_name(paper_standins, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    params = profile(tmp_path, paper_standins, efficiency={"model": "llava-1.5-7b"})
    raw = yaml.safe_load(params.read_text())
    missing = str(tmp_path / "not-downloaded")
    raw["paper"]["models"]["llava-1.5-7b"]["pretrained"] = missing
    params.write_text(yaml.safe_dump(raw))
    plan.write(params)
    outputs = tmp_path / "outputs"
    sweep.main(["--over", "h", "--params", str(params), "--out", str(outputs / "sweep_h")])
    efficiency.main(["--params", str(params), "--out", str(outputs / "efficiency")])
    for stage in ("sweep_h", "efficiency"):
        record = json.loads((outputs / stage / "skipped.json").read_text())
        assert record["model"] == "llava-1.5-7b" and record["stage"] == stage
        assert not record["available"] and missing in record["reason"]
    assert not (outputs / "sweep_h" / "sweep.csv").exists() and not (outputs / "efficiency" / "efficiency.csv").exists()
    assert (outputs / "efficiency" / "app_d.csv").is_file()  # counted on the configurations: no checkpoint needed


# ---------------------------------------------------------------- the timing helper


def test_timing_synchronises_cuda_around_each_timed_call_and_each_part(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", str(device))))
    ticks = iter(range(100))
    clock = lambda: float(next(ticks))  # noqa: E731
    timing.time_call(lambda: calls.append("work"), repeats=2, warmup=1, device="cuda", clock=clock)
    assert calls == ["work"] + [("sync", "cuda"), "work", ("sync", "cuda")] * 2
    calls.clear()
    timing.time_call(lambda: calls.append("work"), repeats=1, warmup=0, device="cpu")
    assert calls == ["work"]  # nothing to synchronise off CUDA

    class Model:
        def outer(self):
            clock()  # one tick of its own work
            return self.inner()

        def inner(self):
            calls.append("inner")

    model, calls[:] = Model(), []
    ticks = iter(range(100))
    with timing.Parts(device="cuda", clock=clock) as parts:
        parts.wrap(model, "outer", "selection")
        parts.wrap(model, "inner", "sensitivity")
        result = timing.time_call(model.outer, repeats=1, warmup=0, device="cuda", clock=clock, parts=parts)
    # clock: 0 start, 1 enter outer, 2 outer's own tick, 3 enter inner, 4 leave inner, 5 leave outer, 6 end
    assert result.seconds == [6.0] and result.parts == [{"sensitivity": 1.0, "selection": 3.0}]
    assert calls == [("sync", "cuda")] * 3 + ["inner"] + [("sync", "cuda")] * 3
    assert "outer" not in vars(model) and "inner" not in vars(model)  # put back on leaving
    assert result.part("sensitivity") == 1.0 and result.part("llm") == 0.0


def test_peak_memory_reads_the_cuda_allocator_only_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    reset = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: reset.append(str(device)))
    timing.reset_peak_memory("cuda:0")
    assert timing.peak_memory("cuda:0") == 3 * 2**20 and reset == ["cuda:0"]
    timing.reset_peak_memory("cpu")
    assert timing.peak_memory("cpu") is None and reset == ["cuda:0"]


def test_a_series_names_the_run_that_left_no_results(tmp_path, monkeypatch):
    from zoo_prune import evaluation

    # a stand-in for lmms-eval that writes the results of the first run of its config only, and exits 0
    script = ("import json, sys, yaml, pathlib; c = yaml.safe_load(open(sys.argv[sys.argv.index('--config') + 1])); "
              "p = pathlib.Path(c[0]['output_path']) / 'm'; p.mkdir(parents=True); "
              "(p / 'x_results.json').write_text(json.dumps({'results': {'pope': {}}}))")
    fake = lambda model, *args, **kwargs: [evaluation.sys.executable, "-c", script, *model]  # noqa: E731
    monkeypatch.setattr(evaluation, "_command", fake)
    with pytest.raises(evaluation.LmmsEvalError, match=r"exit code 0\): no results JSON .* under .*b"):
        evaluation.run_lmms_eval_series({"a": {"pretrained": "x"}, "b": {"pretrained": "x"}}, ["pope"], tmp_path / "s")
    runs = yaml.safe_load((tmp_path / "s" / "lmms_eval_runs.yaml").read_text())
    assert [(r["output_path"], r["model_args"]) for r in runs] == [
        (str(tmp_path / "s" / "a"), f"pretrained=x,resume_cache={evaluation.DEFAULT_CACHE}"),
        (str(tmp_path / "s" / "b"), f"pretrained=x,resume_cache={evaluation.DEFAULT_CACHE}")]
