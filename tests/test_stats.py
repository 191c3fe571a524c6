"""Paired statistics of the results stage against scipy and hand-worked cases, and the proxy stage's exact
encoder Jacobian norms against a float64 autograd Jacobian."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import binom, bootstrap

from analysis import stats


def samples(runs: dict[str, dict[str, tuple[list[str], list[str]]]]) -> pd.DataFrame:
    """Per-sample rows of hand-made runs: ``{run: {task: (targets, predictions)}}``."""
    rows = []
    for run, tasks in runs.items():
        for task, (targets, predictions) in tasks.items():
            metric = "f1" if task.endswith("existence") else "accuracy"
            rows += [{"run": run, "task": task, "doc_id": i, "question": "", "target": t, "prediction": p,
                      "correct": t == p, "metric": metric} for i, (t, p) in enumerate(zip(targets, predictions))]
    return pd.DataFrame(rows)


def accuracy_run(right: list[bool]) -> tuple[list[str], list[str]]:
    return ["a"] * len(right), ["a" if r else "b" for r in right]


def test_mcnemar_exact_p_by_hand():
    # 7 discordant pairs: a right and b wrong once, the reverse 6 times; 5 concordant questions
    a = [True] + [False] * 6 + [True, True, False, True, False]
    b = [False] + [True] * 6 + [True, True, False, True, False]
    data = samples({"a": {"testbed_attribute": accuracy_run(a)}, "b": {"testbed_attribute": accuracy_run(b)}})
    [row] = stats.mcnemar(data, "a", "b").to_dict("records")
    assert (row["a_only"], row["b_only"], row["questions"]) == (1, 6, 12)
    assert row["p"] == pytest.approx(2 * binom.cdf(1, 7, 0.5)) and row["p"] == pytest.approx(0.125)
    same = stats.mcnemar(samples({"a": {"testbed_attribute": accuracy_run(a)}, "b": {"testbed_attribute": accuracy_run(a)}}),
                         "a", "b")
    assert same["p"].iloc[0] == 1.0 and same["a_only"].iloc[0] == same["b_only"].iloc[0] == 0


def test_f1_task_score_by_hand_and_as_the_testbed_scores_it():
    from zoo_prune.testbed.evaluate import score

    targets, predictions = ["yes", "yes", "no", "no", "no"], ["yes", "no", "yes", "no", "no"]
    rows = samples({"r": {"testbed_existence": (targets, predictions)}})
    assert stats.task_score(rows) == pytest.approx(2 * 1 / (2 + 2))  # tp 1, predicted 2, actual 2
    assert stats.task_score(rows) == pytest.approx(score("existence", predictions, targets))
    none = samples({"r": {"testbed_existence": (["no", "no"], ["no", "no"])}})
    assert stats.task_score(none) == 1.0 == score("existence", ["no", "no"], ["no", "no"])


def test_bootstrap_of_one_accuracy_task_is_scipys_percentile_interval():
    rng = np.random.default_rng(3)
    right = list(rng.random(40) < 0.7)
    data = samples({"unpruned": {"testbed_attribute": accuracy_run(right)}})
    result = stats.paired_bootstrap(data, ["unpruned"], resamples=999, seed=5)
    mine = result[(result["measure"] == "testbed_attribute")].iloc[0]
    reference = bootstrap((np.asarray(right, dtype=float),), np.mean, n_resamples=999, method="percentile", rng=5)
    assert mine["value"] == pytest.approx(np.mean(right))
    assert (mine["low"], mine["high"]) == pytest.approx(tuple(reference.confidence_interval))
    assert mine["questions"] == 40


def test_identical_outcomes_give_zero_width_and_identical_methods_zero_difference():
    all_right = accuracy_run([True] * 10)
    mixed = accuracy_run([True, False] * 5)
    existence = (["yes", "no"] * 5, ["yes", "yes"] * 5)
    data = samples({"unpruned": {"testbed_attribute": all_right, "testbed_existence": existence},
                    "x": {"testbed_attribute": mixed, "testbed_existence": existence},
                    "y": {"testbed_attribute": mixed, "testbed_existence": existence}})
    result = stats.paired_bootstrap(data, ["unpruned", "x", "y"], references=["y"], resamples=500)
    own = result[result["versus"] == ""].set_index(["run", "measure"])
    assert own.loc[("unpruned", "testbed_attribute"), ["value", "low", "high"]].tolist() == [1.0, 1.0, 1.0]
    diff = result[(result["run"] == "x") & (result["versus"] == "y")].set_index("measure")
    for measure in ("testbed_attribute", "testbed_existence", "Avg", "Mean"):
        value, low, high = diff.loc[measure, ["value", "low", "high"]]
        assert value == 0 and low <= 0 <= high and low == high == 0  # paired: every resample agrees exactly


def test_paired_difference_by_hand_and_avg_as_the_paper_table():
    # x is right on 3 of 4 questions, unpruned on all 4: difference -0.25; the resamples' differences range over
    # {0, -1/4, ..., -1} (a question where x fails drawn 0 to 4 times), so the interval lies in [-1, 0]
    data = samples({"unpruned": {"testbed_attribute": accuracy_run([True] * 4), "testbed_counting": accuracy_run([True, False])},
                    "x": {"testbed_attribute": accuracy_run([True, True, True, False]),
                          "testbed_counting": accuracy_run([True, False])}})
    result = stats.paired_bootstrap(data, ["x"], references=["unpruned"], resamples=2000)
    diff = result[result["versus"] == "unpruned"].set_index("measure")
    assert diff.loc["testbed_attribute", "value"] == pytest.approx(-0.25)
    assert -1 <= diff.loc["testbed_attribute", "low"] < -0.25 and diff.loc["testbed_attribute", "high"] == 0
    own = result[result["versus"] == ""].set_index("measure")["value"]
    assert own["Avg"] == pytest.approx((0.75 / 1 + 0.5 / 0.5) / 2) and own["Mean"] == pytest.approx((0.75 + 0.5) / 2)
    table = stats.paper_table(pd.DataFrame([{"method": "unpruned", "keep": None, "task": "a", "score": 1.0},
                                            {"method": "unpruned", "keep": None, "task": "c", "score": 0.5},
                                            {"method": "x", "keep": 1, "task": "a", "score": 0.75},
                                            {"method": "x", "keep": 1, "task": "c", "score": 0.5}]), 4)
    assert table.loc[(1, "x"), "Avg"] == pytest.approx(own["Avg"])


def test_runs_must_answer_the_same_questions_and_bad_options_are_named():
    data = samples({"unpruned": {"testbed_attribute": accuracy_run([True] * 4)},
                    "x": {"testbed_attribute": accuracy_run([True] * 3)}})
    with pytest.raises(ValueError, match="different questions"):
        stats.paired_bootstrap(data, ["x"])
    with pytest.raises(ValueError, match="confidence"):
        stats.paired_bootstrap(data, ["x"], confidence=95)
    with pytest.raises(ValueError, match="resamples"):
        stats.paired_bootstrap(data, ["x"], resamples=0)


def test_seed_spread_by_hand():
    rows = samples({"z0": {"testbed_attribute": accuracy_run([True, True, False, False, False])},
                    "z1": {"testbed_attribute": accuracy_run([True, True, True, False, False])},
                    "z2": {"testbed_attribute": accuracy_run([True, False, False, False, False])}})
    rows = rows.assign(method="zoo", keep=16, seed=rows["run"].str[1].astype(int))
    spread = stats.seed_spread(rows, base={"testbed_attribute": 0.8}).set_index("task")
    assert spread.loc["testbed_attribute", ["seeds", "mean", "sd", "min", "max"]].tolist() == pytest.approx([3, 0.4, 0.2, 0.2, 0.6])
    assert spread.loc["Avg", "mean"] == pytest.approx(0.5) and spread.loc["Avg", "sd"] == pytest.approx(0.25)
    assert stats.seed_spread(rows[rows["run"] == "z0"]).empty and stats.seed_spread(rows.iloc[:0]).empty  # one seed: no spread


def test_lmms_samples_reads_the_testbed_metric_entries(tmp_path):
    import json

    lines = [{"doc_id": 0, "target": "yes", "input": "is there a red cross?", "filtered_resps": ["Yes"], "f1": ["existence", "yes", "yes"]},
             {"doc_id": 1, "target": "no", "input": "is there a blue disc?", "filtered_resps": ["yes"], "f1": ["existence", "yes", "no"]}]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "20260101_samples_testbed_existence.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    rows = stats.lmms_samples(tmp_path, {"results": {"testbed_existence": {"f1,none": 0.67}}})
    assert rows[["doc_id", "target", "prediction", "correct", "metric"]].values.tolist() == [
        [0, "yes", "yes", True, "f1"], [1, "no", "yes", False, "f1"]]
    assert rows["question"].iloc[0] == "is there a red cross?"


def test_exact_encoder_norms_match_a_float64_autograd_jacobian():
    """encoder_exact (float32 JVPs) against ||dZ/dx_i||_F from torch.autograd.functional.jacobian in float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.proxy import encoder_backward, encoder_exact, vision_side
    from zoo_prune.testbed.model import TestbedConfig, build_model

    torch.manual_seed(0)
    model, _ = build_model(TestbedConfig(vision_width=16, vision_layers=2, text_width=16, text_layers=1))
    model.eval()
    tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    embeds = torch.randn(1, 1 + tokens, 16)
    chosen = [0, 5, tokens - 1]
    exact = encoder_exact(model, embeds, chosen, chunk=20)
    assert exact[chosen].isfinite().all() and exact.isnan().sum() == tokens - len(chosen)
    double, x64 = copy.deepcopy(model).double(), embeds.double()
    for i in chosen:
        def side(row, i=i):
            x = x64.clone()
            x[0, 1 + i] = row
            return vision_side(double, x)
        with sdpa_kernel(SDPBackend.MATH):  # one column per input dimension (16), forward mode, float64
            jacobian = torch.autograd.functional.jacobian(side, x64[0, 1 + i], strategy="forward-mode", vectorize=True)
        assert exact[i].item() == pytest.approx(jacobian.norm().item(), rel=1e-4)
    sampled = encoder_backward(model, embeds, q=256, seed=0)  # the sampled form estimates the same norms
    assert sampled[chosen].numpy() == pytest.approx(exact[chosen].numpy(), rel=0.25)
