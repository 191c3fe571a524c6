"""The experiment pipeline: stages on a tiny workspace (random-weight testbed model), their failure
behaviour, W&B runs read back from the offline files, and the analysis functions by hand."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import flops, stats
from pipeline import ablation, efficiency, evaluate, proxy, results, sensitivity
from pipeline.train import carry_card
from pipeline_helpers import (ROOT, TASKS, make_workspace, offline_runs, run_stage, small_params, stage_paths, write_params,
                              write_runs)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("pipeline"))


def wandb_env(mode, tmp_path, monkeypatch):
    """W&B in ``mode``, its files under ``tmp_path``; one thread."""
    for key, value in (("WANDB_MODE", mode), ("WANDB_DIR", str(tmp_path)), ("OMP_NUM_THREADS", "1")):
        monkeypatch.setenv(key, value)
    return tmp_path


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    return wandb_env("offline", tmp_path, monkeypatch)


@pytest.fixture
def wandb_disabled(tmp_path, monkeypatch):
    return wandb_env("disabled", tmp_path, monkeypatch)


def leftovers(root):
    """Temporary siblings a stage may have left behind."""
    return [p for p in root.rglob(".*.tmp-*")]


# ---------------------------------------------------------------- analysis, by hand


def test_statistics_by_hand():
    assert stats.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))
    # normalised projector [0, .25, .5, .75, 1]: threshold 0.5 keeps the last three, ranked 1, 3, 2 by the encoder
    rho, kept = stats.proxy_rho([0, 1, 2, 3, 4], [9, 9, 1, 3, 2], threshold=0.5)
    assert kept == 3 and rho == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)
    table = stats.agreement({"a": [[1, 2, 3]], "b": [[3, 2, 1]]})
    assert table.loc["a", "a"] == 1 and table.loc["a", "b"] == pytest.approx(-1)
    with pytest.raises(ValueError, match="threshold"):
        stats.proxy_rho([1, 2], [1, 2], threshold=1.5)


def test_paper_table_normalised_avg_by_hand():
    runs = pd.DataFrame([("unpruned", None, "a", 0.8), ("unpruned", None, "b", 0.5),
                         ("zoo", 2, "a", 0.4), ("zoo", 2, "b", 0.5), ("divprune", 2, "a", 0.8), ("divprune", 2, "b", 0.25)],
                        columns=["method", "keep", "task", "score"])
    table = stats.paper_table(runs, tokens=8, order=["zoo", "divprune"])
    assert list(table.index) == [(8, "unpruned"), (2, "zoo"), (2, "divprune")]
    assert table.loc[(2, "zoo"), "a rel"] == pytest.approx(0.5)
    assert table.loc[(2, "zoo"), "Avg"] == pytest.approx(0.75)  # (0.4 / 0.8 + 0.5 / 0.5) / 2
    assert table.loc[(2, "divprune"), "Avg"] == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert table.loc[(2, "zoo"), "Mean"] == pytest.approx(0.45) and table.loc[(2, "divprune"), "Mean"] == pytest.approx(0.525)
    assert table.loc[(8, "unpruned"), "Avg"] == 1 and table.loc[(2, "zoo"), "pruned %"] == 75
    assert "| 2 | zoo | 75 | 0.4 | 50.0% |" in stats.markdown_table(table)
    with pytest.raises(ValueError, match="exactly one 'unpruned'"):
        stats.paper_table(runs[runs["method"] != "unpruned"], tokens=8)


def test_task_scores_take_each_tasks_primary_metric():
    results = {"results": {"testbed": {" ": " ", "alias": "testbed"},
                           "testbed_existence": {"alias": "x", "f1,none": 0.5, "f1_stderr,none": "N/A"},
                           "mme": {"mme_cognition_score,none": 300.0, "mme_perception_score,none": 1500.0},
                           "pope": {"pope_accuracy,none": 0.9, "pope_f1_score,none": 0.8},
                           "pope_standin": {"pope_accuracy,none": 0.7, "pope_f1_score,none": 0.6},  # by metric, not name
                           "seedbench": {"seed_all,none": 0.3, "seed_video,none": 0.1, "seed_image,none": 0.4}}}
    assert stats.task_scores(results) == {"testbed_existence": 0.5, "mme": 1800.0, "pope": 0.8, "pope_standin": 0.6,
                                          "seedbench": 0.4}


def test_flops_formula_matches_app_d_at_160_tokens():
    """FastV's per-layer count on Vicuna-7B over 160 visual tokens = App. D's 0.81 TFLOPs (LLM part only)."""
    next7b = flops.PAPER_MODELS["llava-next-7b"]
    llm = flops.prefill_flops(next7b, 160, 0)["llm"] / 1e12
    assert llm == pytest.approx(flops.PAPER_APP_D[("divprune", 160)], rel=0.01)
    assert llm == pytest.approx(32 * (4 * 160 * 4096**2 + 2 * 160**2 * 4096 + 2 * 160 * 4096 * 11008) / 1e12)
    costs = {e: flops.sensitivity_flops(576, 64, (1024, 4096, 4096), e) for e in ("naive", "fused", "lowrank")}
    assert costs["naive"] > costs["fused"] > costs["lowrank"]
    with pytest.raises(ValueError, match="'bogus'"):
        flops.sensitivity_flops(576, 64, (1024, 4096, 4096), "bogus")


# ---------------------------------------------------------------- stages


def test_sensitivity_stage_writes_outputs_and_one_offline_wandb_run(workspace, wandb_offline):
    paths = stage_paths(workspace, "sensitivity")
    run_stage(sensitivity, workspace, **paths)
    scores = np.load(paths["out"] / "sensitivities.npz")
    assert sorted(scores) == sorted(["naive", "fused", "lowrank", "closed_form"])
    assert scores["naive"].shape == (3, 144)
    agreement = pd.read_csv(paths["out"] / "agreement.csv", index_col=0)
    assert np.allclose(np.diag(agreement), 1) and agreement.loc["fused", "naive"] > 0.999  # the same values
    assert {p.name for p in paths["figures"].glob("*.png")} == {"agreement.png", "overlays.png"}
    metrics = yaml.safe_load(paths["metrics"].read_text())
    assert metrics["samples"] == 3 and metrics["tokens"] == 144
    [run] = offline_runs(wandb_offline)
    assert (run["job_type"], run["group"], run["project"]) == ("sensitivity", "pytest", "zoo-prune")
    assert run["config"]["zoo"]["h"] == 0.01 and run["config"]["sensitivity"]["samples"] == 3
    assert "rho_vs_naive/fused" in run["summary"] and "stage_seconds" in run["summary"]
    assert len(run["images"]) == 2
    assert not leftovers(workspace)


def test_proxy_stage_with_wandb_disabled_leaves_no_run(workspace, wandb_disabled):
    paths = stage_paths(workspace, "proxy")
    run_stage(proxy, workspace, **paths)
    rhos = pd.read_csv(paths["out"] / "rhos.csv")
    assert list(rhos.groupby("task").size()) == [3, 3] and rhos["rho"].between(-1, 1).all()
    assert set(rhos[rhos.task == "existence"].id).isdisjoint(rhos[rhos.task == "attribute"].id)
    metrics = yaml.safe_load(paths["metrics"].read_text())
    assert metrics["form"] == "backward" and set(metrics) >= {"mean_rho/existence", "mean_rho/attribute"}
    assert (paths["figures"] / "proxy_kde.png").stat().st_size > 10_000
    assert not (wandb_disabled / "wandb").exists()


def test_backward_and_finite_difference_encoder_forms_agree(workspace):
    """Both proxy forms measure the same Jacobian: their token rankings agree on the tiny model."""
    import torch

    from pipeline._common import load_model

    model, processor = load_model(workspace / "model")
    tower = model.model.vision_tower  # CLIPVisionModel: embeddings, pre_layrnorm, encoder (transformers 5)
    with torch.no_grad():
        embeds = tower.embeddings(torch.randn(1, 3, 96, 96))
    backward = proxy.encoder_backward(model, embeds, q=64, seed=0)
    finite = proxy.encoder_finite_difference(model, embeds, m=8, h=1e-3, seed=0, chunk=512)
    assert stats.spearman(backward, finite) > 0.8


@pytest.mark.parametrize("override, message", [
    ({"zoo.h": -1.0}, "h=-1.0"),
    ({"sensitivity.estimators": ["naive", "nope"]}, "'nope'"),
    ({"sensitivity.samples": 999}, "999"),
])
def test_bad_param_names_the_problem_and_writes_nothing(workspace, wandb_disabled, tmp_path, override, message):
    write_params(tmp_path, small_params(**override))
    paths = stage_paths(tmp_path, "sensitivity", model=False, data=False)
    with pytest.raises(SystemExit, match=re.escape(message)) as error:
        run_stage(sensitivity, tmp_path, model=workspace / "model", data=workspace / "data" / "testbed", **paths)
    assert str(error.value).startswith("error: stage sensitivity:")
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.*"))
    assert not leftovers(tmp_path)


def test_missing_input_and_failure_midway_leave_nothing(workspace, wandb_disabled, tmp_path, monkeypatch):
    paths = stage_paths(tmp_path, "proxy", model=False, data=False)
    with pytest.raises(SystemExit, match="no/such/model"):
        run_stage(proxy, workspace, model=tmp_path / "no/such/model", data=workspace / "data" / "testbed", **paths)
    with pytest.raises(SystemExit, match=r"nodata.* not found .*`dvc repro data`"):
        run_stage(proxy, workspace, model=workspace / "model", data=tmp_path / "nodata", **paths)
    # the CSV is written, then drawing the figure fails: nothing may stay behind
    monkeypatch.setattr(proxy.figures, "proxy_kde", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        run_stage(proxy, workspace, model=workspace / "model", data=workspace / "data" / "testbed", **paths)
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.*"))
    assert not leftovers(tmp_path)


def test_evaluate_stage_runs_lmms_eval_and_writes_scores(workspace, wandb_offline, monkeypatch):
    monkeypatch.chdir(workspace)  # the task YAMLs read data/testbed relative to the working directory
    out, metrics = workspace / "outputs/evaluate/zoo-16", workspace / "outputs/metrics/evaluate/zoo-16.json"
    run_stage(evaluate, workspace, "--method", "zoo", "--keep", "16", model=workspace / "model", out=out, metrics=metrics,
              data=workspace / "data" / "testbed")
    scores = yaml.safe_load((out / "scores.json").read_text())
    assert sorted(scores) == sorted(TASKS) and all(0 <= s <= 1 for s in scores.values())
    assert (out / "results.json").exists() and yaml.safe_load(metrics.read_text()) == scores
    per_question = pd.read_csv(out / "samples.csv", keep_default_na=False)  # limit 1: one question per task
    assert sorted(per_question["task"]) == sorted(TASKS) and per_question["doc_id"].eq(0).all()
    assert (per_question["correct"] == (per_question["prediction"] == per_question["target"])).all()
    from zoo_prune.testbed.evaluate import score

    for row in per_question.itertuples():  # lmms-eval's score of one question, recomputed from its row
        assert scores[row.task] == score(row.task.removeprefix("testbed_"), [row.prediction], [row.target])
    assert yaml.safe_load((out / "run.json").read_text())["seed"] == 0
    [run] = offline_runs(wandb_offline)
    assert run["job_type"] == "evaluate" and run["config"]["zoo"]["m"] == 8 and "score/testbed_existence" in run["summary"]
    assert {k: run["config_updates"][k] for k in ("method", "keep", "seed")} == {"method": "zoo", "keep": 16, "seed": 0}
    [table] = run["tables"].values()  # images of the pruned tokens dimmed (W&B stores identical ones once)
    assert any(path.endswith(".png") for path in table) and any(p.endswith("table.json") for p in table)
    with pytest.raises(SystemExit, match="--keep 17 is not one of params budgets"):
        run_stage(evaluate, workspace, "--method", "zoo", "--keep", "17", model=workspace / "model",
                  out=workspace / "outputs/evaluate/zoo-17", metrics=workspace / "outputs/metrics/zoo-17.json")
    assert not (workspace / "outputs/evaluate/zoo-17").exists()


def hand_made_runs(params: dict) -> dict:
    """Every run results and ablation read, answers by hand: attribute (5 questions, target "red") right on
    all for unpruned, on 2 for every method (questions 0-1; DivPrune 2-3), on 3 and 1 for ZOO-Prune's extra
    seeds; existence (F1) 1 for unpruned (every answer right, so 1 on every resample too), 0.5 for every
    other run (tp 1, predicted 2, actual 2)."""
    methods = params["evaluate"]["zoo_methods"] + params["evaluate"]["baselines"]
    existence = (["yes", "yes", "no", "no", "no"], ["yes", "no", "yes", "no", "no"])

    def attribute(right):
        return ["red"] * 5, ["red" if i in right else "blue" for i in range(5)]

    runs = {"unpruned": {"testbed_attribute": attribute({0, 1, 2, 3, 4}), "testbed_existence": (existence[0], existence[0])}}
    for k in params["budgets"]:
        runs |= {f"{m}-{k}": {"testbed_attribute": attribute({2, 3} if m == "divprune" else {0, 1}),
                              "testbed_existence": existence} for m in methods}
        runs |= {f"zoo-{k}-seed{s}": {"testbed_attribute": attribute(right), "testbed_existence": existence}
                 for s, right in zip(params["evaluate"]["seeds"], ({0, 1, 2}, {0}))}
    return runs


def test_results_and_ablation_tables_from_the_runs(workspace, wandb_disabled, tmp_path):
    params = small_params()
    methods = params["evaluate"]["zoo_methods"] + params["evaluate"]["baselines"]
    write_runs(tmp_path / "evaluate", hand_made_runs(params))
    paths = stage_paths(tmp_path, "results", data=False) | {"model": workspace / "model"}
    run_stage(results, workspace, runs=tmp_path / "evaluate", **paths)
    table = pd.read_csv(paths["out"] / "table.csv")
    assert len(table) == 1 + len(methods) * len(params["budgets"])
    assert table["Avg"].iloc[1:].eq((0.4 + 0.5) / 2).all() and table["questions"].eq(10).all()
    assert (table["Avg low"] <= table["Avg"]).all() and (table["Avg"] <= table["Avg high"]).all()
    markdown = {name: (paths["out"] / f"{name}.md").read_text() for name in ("table", "comparisons", "mcnemar", "seeds")}
    assert "| 48 | zoo | 66.7 | 40.0 [" in markdown["table"] and "5 test questions per task" in markdown["table"]
    assert not [name for name, text in markdown.items() if "nan" in text.lower() or "Unnamed" in text]
    mcnemar = pd.read_csv(paths["out"] / "mcnemar.csv").set_index(["tokens", "task"])
    row = mcnemar.loc[(48, "testbed_attribute")]  # zoo right only on 0-1, divprune only on 2-3: b = c = 2
    assert (row["only zoo correct"], row["only divprune correct"], row["p (McNemar exact)"]) == (2, 2, 1.0)
    assert mcnemar.loc[(48, "testbed_existence"), "test"] == "paired bootstrap of F1" and not mcnemar["significant"].any()
    comparisons = pd.read_csv(paths["out"] / "comparisons.csv")
    same = comparisons[(comparisons.method == "zoo") & (comparisons.versus == "divprune") & (comparisons.measure == "Mean")]
    assert same["value"].eq(0).all() and (same["low"] <= 0).all() and (same["high"] >= 0).all()
    seeds = pd.read_csv(paths["out"] / "seeds.csv").set_index(["method", "keep", "task"])
    assert seeds.loc[("zoo", 16, "testbed_attribute"), ["seeds", "mean", "sd"]].tolist() == pytest.approx([3, 0.4, 0.2])
    assert {p.name for p in paths["figures"].glob("*.png")} == {"avg_vs_tokens.png", "differences.png"}
    paths = stage_paths(tmp_path, "ablation", data=False) | {"model": workspace / "model"}
    run_stage(ablation, workspace, runs=tmp_path / "evaluate", **paths)
    table = pd.read_csv(paths["out"] / "table.csv")
    assert list(table.loc[table.tokens == 48, "variant"]) == ["sensitivity_only", "divprune", "sum_fusion", "zoo"]
    assert list(table.loc[table.tokens == 48, "Fusion"]) == ["none", "none", "sum", "multiply"]
    assert list(table.loc[table.tokens == 48, "Diversity"]) == ["no", "yes", "yes", "yes"]
    assert "nan" not in (paths["out"] / "table.md").read_text().lower()
    (tmp_path / "evaluate" / "zoo-16" / "scores.json").unlink()
    with pytest.raises(SystemExit, match=r"missing .*\['zoo-16'\]"):
        run_stage(ablation, workspace, runs=tmp_path / "evaluate", **paths | {"out": tmp_path / "again"})
    assert not (tmp_path / "again").exists()


def test_results_name_a_run_without_per_sample_table(workspace, wandb_disabled, tmp_path):
    params = small_params()
    write_runs(tmp_path / "evaluate", hand_made_runs(params))
    (tmp_path / "evaluate" / "zoo-16-seed2" / "samples.csv").unlink()
    paths = stage_paths(tmp_path, "results", data=False) | {"model": workspace / "model"}
    with pytest.raises(SystemExit, match=r"samples.csv.*\['zoo-16-seed2'\]"):
        run_stage(results, workspace, runs=tmp_path / "evaluate", **paths)
    assert not paths["out"].exists() and not leftovers(tmp_path)


def test_efficiency_stage_measures_every_method_counts_flops_and_records_conditions(workspace, wandb_disabled, tmp_path):
    paths = stage_paths(workspace, "efficiency")
    params = small_params()
    run_stage(efficiency, workspace, **paths)
    testbed = pd.read_csv(paths["out"] / "testbed.csv")
    assert len(testbed) == 1 + 4 * 2 and (testbed[["prefill_ms", "e2e_ms"]] > 0).all().all()
    assert (testbed["prefill_min_ms"] <= testbed["prefill_ms"]).all() and (testbed["prefill_ms"] <= testbed["prefill_max_ms"]).all()
    # FLOPs from the ledger: the sensitivity part only for the methods that compute sensitivities
    assert (testbed.loc[testbed.method.isin(["zoo", "sum_fusion", "sensitivity_only"]), "gflops_sensitivity"] > 0).all()
    assert (testbed.loc[testbed.method.isin(["unpruned", "divprune"]), "gflops_sensitivity"] == 0).all()
    unpruned = testbed[testbed.method == "unpruned"].iloc[0]
    assert (testbed.loc[testbed.tokens == 16, "gflops_llm"] < unpruned["gflops_llm"]).all()
    conditions = json.loads((paths["out"] / "conditions.json").read_text())
    assert conditions["torch_threads"] == params["efficiency"]["threads"]
    assert {"load_average_1min_before", "load_average_1min_after", "flagged"} <= set(conditions)
    metrics = yaml.safe_load(paths["metrics"].read_text())
    assert metrics["conditions/flagged"] == conditions["flagged"]
    assert {p.name for p in paths["figures"].glob("*.png")} == {"prefill.png", "e2e.png", "layer_cpu.png"}
    assert not (paths["out"] / "paper_flops.csv").exists()  # the paper models' ledger: the paper profile's stage


def test_train_stage_keeps_the_model_card_only_for_the_same_training_config(tmp_path):
    import json

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "README.md").write_text("card of seed 0")
    (old / "training_log.json").write_text(json.dumps({"config": {"seed": 0, "a_steps": 3000}}))
    carry_card(old, new, {"seed": 0, "a_steps": 1500})  # another model: its card would lie
    assert not (new / "README.md").exists()
    carry_card(old, new, {"seed": 0, "a_steps": 3000})
    assert (new / "README.md").read_text() == "card of seed 0"
    carry_card(tmp_path / "absent", tmp_path, {"seed": 0})  # no previous folder: nothing to carry, no error


def test_dvc_yaml_declares_what_each_stage_reads():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    reads_h = {name for name, s in dvc.items() if any(p in ("zoo", "zoo.h") for p in s.get("params", []))}
    assert reads_h == {"sensitivity", "proxy", "evaluate_zoo", "evaluate_seeds", "sweep_m"}  # `dvc exp run -S zoo.h=...` reruns these
    assert dvc["evaluate_seeds"]["matrix"]["seed"] == "${evaluate.seeds}" and "results" in dvc["results"]["params"]
    assert all(plot[name].get("template") == "log_x" for plot in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
               if isinstance(plot, dict) for name in plot)
    assert "zoo.h" not in dvc["sweep_h"]["params"] and "zoo.m" not in dvc["sweep_m"]["params"]
    for name, s in dvc.items():
        module = re.match(r"python -m pipeline\.(\w+)", s["cmd"]).group(1)
        assert (ROOT / "pipeline" / f"{module}.py").exists(), name
        assert name in ("data", "train", "report") or s.get("metrics"), f"{name} declares no metrics"
    assert dvc["train"]["outs"] == [{"models/testbed-llava": {"cache": False, "persist": True}}] and dvc["train"]["frozen"]
    assert "data/testbed/card.json" in dvc["train"]["deps"] and "data/testbed" not in dvc["train"]["deps"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    from zoo_prune import available_methods, method_class

    evaluated = params["evaluate"]["zoo_methods"] + params["evaluate"]["baselines"]
    built_in = [m for m in available_methods() if method_class(m).__module__.startswith("zoo_prune.")]
    assert sorted(evaluated) == built_in  # make repro evaluates every method the library registers
    assert all(method_class(m).params_section == "zoo" for m in params["evaluate"]["zoo_methods"])
    assert params["budgets"] == [48, 32, 16] and params["profile"] == "testbed"


def test_report_renders_csv_tables_without_index_columns_or_nan():
    from pipeline import report

    agreement = pd.DataFrame({"Unnamed: 0": ["naive", "fused"], "naive": [1.0, 0.99999], "fused": [0.99999, 1.0]})
    text = report.render_csv(agreement, "estimator", report._fixed(3))
    assert text.splitlines()[0] == "| estimator | naive | fused |" and "| fused | 1.000 | 1.000 |" in text
    flops_table = pd.DataFrame({"model": ["m", "m"], "tokens": [576, 64], "tflops": [3.5, 1.0], "paper_app_d": [np.nan, 0.94]})
    text = report.render_csv(flops_table)
    assert "nan" not in text.lower() and "| m | 576 | 3.50 |  |" in text and "TFLOPs (prefill, formula)" in text
    commit, date = report.provenance(ROOT)
    assert re.fullmatch(r"[0-9a-f]{12}( \+ uncommitted changes)?", commit) and date.endswith("UTC")
