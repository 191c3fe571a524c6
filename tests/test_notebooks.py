"""The notebooks run headless (papermill) on a tiny workspace's real stage outputs and show figures."""

import json

import pytest

from pipeline import ablation, proxy, results, sensitivity
from pipeline_helpers import ROOT, make_workspace, run_stage, small_params, stage_paths, write_runs

NOTEBOOKS = {"sensitivity": 3, "proxy_analysis": 1, "results": 3}  # figures each must show on this fixture


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """sensitivity and proxy run on a random-weight model; results and ablation on hand-made scores."""
    root = make_workspace(tmp_path_factory.mktemp("notebooks"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "disabled")
        for module, name in ((sensitivity, "sensitivity"), (proxy, "proxy")):
            run_stage(module, root, **stage_paths(root, name))
        params = small_params()
        methods = params["evaluate"]["zoo_methods"] + params["evaluate"]["baselines"]
        targets = ["red"] * 5
        answers = {"unpruned": ["red"] * 5} | {f"{m}-{k}": ["red"] * 3 + ["blue"] * 2
                                                          for m in methods for k in params["budgets"]}
        answers |= {f"zoo-{k}-seed{s}": ["red"] * 2 + ["blue"] * 3 for k in params["budgets"] for s in params["evaluate"]["seeds"]}
        write_runs(root / "outputs" / "evaluate", {name: {"testbed_attribute": (targets, a)} for name, a in answers.items()})
        for module, name in ((results, "results"), (ablation, "ablation")):
            run_stage(module, root, runs=root / "outputs" / "evaluate", **stage_paths(root, name, data=False))
    return root / "outputs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_headless(outputs, tmp_path, name, monkeypatch):
    import papermill

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    done = papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
                                      parameters={"OUTPUTS": str(outputs)}, kernel_name="python3",
                                      cwd=str(ROOT / "notebooks"), progress_bar=False)
    shown = [o for c in done.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in shown if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in shown) >= NOTEBOOKS[name]
    text = json.dumps([o.get("data", {}).get("text/markdown", "") for o in shown])
    if name == "proxy_analysis":
        assert "Encoder-side form: **backward**" in text
    if name == "results":
        assert "| 48 | zoo |" in text and "sweep_h/sweep.csv not produced yet" in text


# ---------------------------------------------------------------- the paper profile (PROFILE = "paper")

PAPER_NOTEBOOKS = {"results": 9, "sensitivity": 1, "proxy_analysis": 1}  # figures each must show on this fixture


@pytest.fixture(scope="module")
def paper_outputs(tmp_path_factory):
    """A rehearsal-like paper-profile run: evaluate entries by hand (paper_helpers), the results and ablation
    stages on them, sensitivity and proxy outputs by kind, no sweeps or efficiency."""
    from paper_helpers import fake_stage_outputs, make_paper_outputs, tables_of

    root = tmp_path_factory.mktemp("paper_notebooks")
    tables_of(root, make_paper_outputs(root))
    fake_stage_outputs(root / "outputs", proxy=True)
    return root / "outputs"


@pytest.mark.parametrize("name", PAPER_NOTEBOOKS)
def test_notebook_opens_a_paper_profile_run(paper_outputs, tmp_path, name, monkeypatch):
    import papermill

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    done = papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
                                      parameters={"PROFILE": "paper", "OUTPUTS": str(paper_outputs)},
                                      kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
    shown = [o for c in done.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in shown if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in shown) == PAPER_NOTEBOOKS[name]
    text = json.dumps([o.get("data", {}).get("text/markdown", "") + o.get("data", {}).get("text/plain", "")
                       for o in shown])
    assert "RANDOM-WEIGHT REHEARSAL" in text
    if name == "results":
        assert "the paper's Table 1" in text and "the paper's Table 5" in text and "(58.47; -8.47)" in text
        assert "sweep_h`: not run" in text and "Fig. 5" in text  # the paper's Fig. 5 numbers, efficiency not run
    if name == "sensitivity":
        assert "llava-1.5-13b" in text and "skipped" in text
    if name == "proxy_analysis":
        assert "mean_spearman_rho" in text
