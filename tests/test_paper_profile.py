"""The paper profile's frame: params overlays, the plan (one DVC entry per model x method x budget), the
checkpoint records, skipping an absent model by name, and one evaluate entry on a stand-in."""

import json
import shutil
import subprocess

import pandas as pd
import pytest
import yaml
from pipeline_helpers import ROOT, paper_params

from pipeline import checkpoints, evaluate, plan
from pipeline.schema import ParamsError, load, merge, read

PAPER = ROOT / "paper" / "params.yaml"


def test_a_profile_file_sets_keys_of_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"a": {"x": 1, "y": [1, 2], "z": {"p": 1, "q": 2}}, "b": 3}))
    (tmp_path / "mid.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "a": {"y": [9], "z": {"q": 5}}}))
    (tmp_path / "top.yaml").write_text(yaml.safe_dump({"base": "mid.yaml", "b": 4}))
    assert read(tmp_path / "top.yaml") == {"a": {"x": 1, "y": [9], "z": {"p": 1, "q": 5}}, "b": 4}  # lists replaced
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"base": "loop.yaml"}))
    with pytest.raises(ParamsError, match="loops"):
        read(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text(yaml.safe_dump({"base": "gone.yaml"}))
    with pytest.raises(ParamsError, match="gone.yaml.*the base of"):
        read(tmp_path / "orphan.yaml")


def test_paper_params_keep_the_root_knobs_and_refuse_bad_references(tmp_path):
    params = load(PAPER)
    root = load(ROOT / "params.yaml")
    assert params["profile"] == "paper" and root["profile"] == "testbed" and root["paper"] is None
    assert params["zoo"] == root["zoo"] and params["sweep"] == root["sweep"]  # one home: the root file
    for edits, expected in [({"sweep": {"keep": 100}, "proxy": {"model": "llava-2"}},
                             ["paper.sweep.keep = 100", "paper.proxy.model = 'llava-2'"]),
                            ({"models": {"qwen2.5-vl-7b": {"architecture": "QwenForSomething"}}},
                             ["paper.models.qwen2.5-vl-7b.architecture = 'QwenForSomething'"])]:
        raw = yaml.safe_load(PAPER.read_text())
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({**raw, "base": str(ROOT / "params.yaml"),
                                                              "paper": merge(raw["paper"], edits)}))
        with pytest.raises(ParamsError) as error:
            load(tmp_path / "params.yaml")
        assert all(e in str(error.value) for e in expected), str(error.value)


# The registry's kinds and stochastic methods, written out by hand (an independent statement of what applies).
VISION = {"visionzip"}
STOCHASTIC = {"zoo", "sum_fusion", "sensitivity_only", "random"}


def expected_entries(params: dict) -> set[str]:
    paper = params["paper"]
    names = set()
    for model, spec in paper["models"].items():
        names.add(f"evaluate_unpruned@{model}")
        methods = list(spec.get("methods") or paper["methods"])
        if model == paper["ablation"]["model"]:
            methods += [v for v in params["ablation"]["variants"] if v not in methods]
        for method in methods:
            if method in VISION and spec["architecture"].startswith("Qwen"):
                continue
            group = "evaluate_zoo" if method in {"zoo", "sum_fusion", "sensitivity_only"} else "evaluate_baseline"
            for keep in spec["budgets"]:
                names.add(f"{group}@{model}-{method}-{keep}")
                if method in STOCHASTIC:
                    names |= {f"evaluate_seeds@{model}-{method}-{keep}-seed{s}" for s in paper["seeds"]}
    return names


def test_the_committed_plan_is_current_and_lists_every_applicable_entry():
    params = load(PAPER)
    assert plan.stale(PAPER) is None, "run python -m pipeline.plan paper/params.yaml"
    committed = yaml.safe_load((ROOT / "paper" / "plan.yaml").read_text())
    got = {f"{group}@{key}" for group, items in committed.items() if group.startswith("evaluate") for key in items}
    assert got == expected_entries(params)
    assert "evaluate_baseline@qwen2.5-vl-7b-visionzip-0.2" not in got and "evaluate_zoo@qwen2.5-vl-7b-zoo-0.2" in got
    assert "evaluate_zoo@llava-next-7b-sum_fusion-160" in got and "evaluate_zoo@llava-1.5-7b-sum_fusion-64" not in got
    for folder, names in plan.outputs(committed).items():  # DVC's .gitignore files, so the dependency folders exist
        assert (ROOT / "paper" / "outputs" / folder / ".gitignore").read_text().split() == [f"/{n}" for n in names]


def test_dvc_dry_run_plans_every_entry_of_the_paper_profile():
    dvc = shutil.which("dvc")
    if dvc is None:
        pytest.skip("dvc not on PATH")
    done = subprocess.run([dvc, "repro", "--dry", "paper/dvc.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    planned = {line.split("'")[1].removeprefix("paper/dvc.yaml:") for line in done.stdout.splitlines()
               if line.startswith("Running stage")}
    evaluate_entries = {name for name in planned if name.startswith("evaluate")}
    assert evaluate_entries == expected_entries(load(PAPER))
    assert {"results", "ablation", "sweep_h", "sweep_m", "efficiency", "proxy", "report"} <= planned
    assert {f"checkpoints@{m}" for m in load(PAPER)["paper"]["models"]} <= planned


def test_a_stale_plan_is_refused_naming_the_command(tmp_path, paper_standins):
    params = paper_params(tmp_path / "profile", paper_standins, models=["llava-1.5-7b"])
    raw = yaml.safe_load(params.read_text())
    raw["paper"]["models"]["llava-1.5-7b"]["budgets"] = [64, 32]
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit, match=r"does not list the entries.*python -m pipeline.plan .*params.yaml"):
        checkpoints.main(["--params", str(params), "--paper-model", "llava-1.5-7b", "--out", str(tmp_path / "c.json")])
    assert not (tmp_path / "c.json").exists()


def test_checkpoint_records_name_what_is_missing(tmp_path, paper_standins, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # nothing cached: hub ids are absent
    params = paper_params(tmp_path / "profile", paper_standins)
    raw = yaml.safe_load(params.read_text())
    raw["paper"]["models"]["llava-1.5-13b"]["pretrained"] = "llava-hf/llava-1.5-13b-hf"
    raw["paper"]["models"]["qwen2.5-vl-7b"]["architecture"] = "LlavaForConditionalGeneration"
    params.write_text(yaml.safe_dump(raw))
    plan.write(params)
    records = {}
    for name in ("llava-1.5-7b", "llava-1.5-13b", "qwen2.5-vl-7b"):
        out = tmp_path / f"{name}.json"
        checkpoints.main(["--params", str(params), "--paper-model", name, "--out", str(out)])
        records[name] = json.loads(out.read_text())
    assert records["llava-1.5-7b"]["available"] and records["llava-1.5-7b"]["revision"].startswith("local:")
    assert records["llava-1.5-7b"]["path"] == str((paper_standins / "models" / "llava-1.5-7b").resolve())
    absent = records["llava-1.5-13b"]
    assert not absent["available"] and "'llava-hf/llava-1.5-13b-hf'" in absent["reason"] and "hf download llava-hf/llava-1.5-13b-hf" in absent["reason"]
    wrong = records["qwen2.5-vl-7b"]
    assert not wrong["available"] and "Qwen2_5_VLForConditionalGeneration" in wrong["reason"]


def test_an_entry_runs_on_a_stand_in_and_an_absent_model_is_skipped_by_name(tmp_path, paper_standins, caplog):
    params = paper_params(tmp_path / "profile", paper_standins, models=["llava-1.5-7b", "llava-1.5-13b"], limit=2,
                          tasks=["pope_standin", "gqa_standin"], benchmarks={"pope_standin": "pope", "gqa_standin": "gqa"})
    raw = yaml.safe_load(params.read_text())
    raw["paper"]["models"]["llava-1.5-13b"]["pretrained"] = str(tmp_path / "not-downloaded")
    params.write_text(yaml.safe_dump(raw))
    plan.write(params)
    out = tmp_path / "profile" / "outputs" / "evaluate"
    evaluate.main(["--params", str(params), "--paper-model", "llava-1.5-13b", "--method", "zoo", "--keep", "64",
                   "--out", str(out / "llava-1.5-13b" / "zoo-64")])
    record = json.loads((out / "llava-1.5-13b" / "zoo-64" / "skipped.json").read_text())
    assert record["model"] == "llava-1.5-13b" and "not-downloaded" in record["reason"]
    assert "skipped llava-1.5-13b" in caplog.text
    evaluate.main(["--params", str(params), "--paper-model", "llava-1.5-7b", "--method", "divprune", "--keep", "64",
                   "--out", str(out / "llava-1.5-7b" / "divprune-64")])
    run = out / "llava-1.5-7b" / "divprune-64"
    scores = json.loads((run / "scores.json").read_text())
    assert set(scores) == {"pope_standin", "gqa_standin"}
    samples = pd.read_csv(run / "samples.csv")
    assert samples.groupby("task").size().to_dict() == {"gqa_standin": 2, "pope_standin": 2}
    info = json.loads((run / "run.json").read_text())
    assert info["model"] == "llava-1.5-7b" and info["keep"] == 64 and info["revision"].startswith("local:")
    with pytest.raises(SystemExit, match=r"--keep 48 is not one of params paper.models.llava-1.5-7b.budgets \[64\]"):
        evaluate.main(["--params", str(params), "--paper-model", "llava-1.5-7b", "--method", "zoo", "--keep", "48",
                       "--out", str(out / "llava-1.5-7b" / "zoo-48")])


def test_dry_run_prints_each_entry_with_the_models_own_budget_and_launcher(tmp_path, capsys):
    raw = yaml.safe_load(PAPER.read_text())
    raw["base"] = str(ROOT / "params.yaml")
    raw["paper"]["dir"] = str(tmp_path)
    raw["paper"]["num_processes"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    plan.write(tmp_path / "params.yaml")
    evaluate.main(["--params", str(tmp_path / "params.yaml"), "--dry-run", "--method", "zoo"])
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == (3 + 3 + 3 + 2) * (1 + len(raw["paper"]["seeds"]))  # the models' own budgets, every seed
    assert all(c.split()[1:3] == ["launch", "--num_processes=4"] for c in commands)
    assert any("pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,method=zoo,keep=640," in c and "estimator=lowrank" in c for c in commands)
    assert any("pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=zoo,keep=0.1," in c and "dtype" not in c for c in commands)
    assert all("--tasks gqa,mmbench_en_dev_static,mme,pope,scienceqa_img,vqav2_val,textvqa_val,mmmu_val,seedbench" in c
               for c in commands)
    assert not (tmp_path / "outputs" / "evaluate" / "llava-1.5-7b" / "zoo-64").exists()


def test_the_committed_rehearsal_profile_is_current():
    """rehearsal/params.yaml and rehearsal/plan.yaml are written by `python -m pipeline.rehearse --params-only` from
    paper/params.yaml and rehearsal/overrides.yaml; DVC parses rehearsal/dvc.yaml in every command, so both are
    committed (a fresh clone's `dvc repro` would fail without them) and must be current."""
    from pipeline import rehearse

    committed = (ROOT / "rehearsal" / "params.yaml").read_text()
    written = rehearse.write_params(ROOT / "paper" / "params.yaml", ROOT / "rehearsal" / "overrides.yaml",
                                    ROOT / "rehearsal" / "params.yaml")
    try:
        assert written.read_text() == committed, "run python -m pipeline.rehearse --params-only"
    finally:
        written.write_text(committed)
    assert (ROOT / "rehearsal" / "dvc.yaml").resolve() == (ROOT / "paper" / "dvc.yaml").resolve()
    params = load(ROOT / "rehearsal" / "params.yaml")
    assert plan.stale(ROOT / "rehearsal" / "params.yaml", params) is None, "run python -m pipeline.rehearse --params-only"


def test_several_cpu_processes_are_launched_as_such():
    """accelerate starts ONE process for --num_processes=2 on a machine without GPUs unless it is told to use CPU
    processes (ACCELERATE_USE_CPU with its multi-process launcher); the lmms-eval model then takes its rank."""
    from zoo_prune.evaluation import lmms_eval_command

    cpu = lmms_eval_command({"pretrained": "m"}, ["pope"], "out", num_processes=2, device="cpu", include_path=None)
    assert cpu[:2] == ["env", "ACCELERATE_USE_CPU=1"] and cpu[3:6] == ["launch", "--multi_gpu", "--num_processes=2"]
    gpu = lmms_eval_command({"pretrained": "m"}, ["pope"], "out", num_processes=2, device="cuda", include_path=None)
    assert gpu[1:3] == ["launch", "--num_processes=2"] and "--multi_gpu" not in gpu and "env" not in gpu


def test_wandb_tables_take_mixed_and_nullable_columns():
    import wandb

    from pipeline._common import wandb_frame

    frame = pd.DataFrame({"rank": pd.array([None, 32], dtype="Int64"), "why": [None, "not Linear-act-Linear"],
                          "runs": [True, False], "rho": [float("nan"), 0.5]})
    table = wandb.Table(dataframe=wandb_frame(frame))  # raw: "Data row contained incompatible types"
    assert [r[1] for r in table.data] == ["", "not Linear-act-Linear"] and table.data[1][0] == 32.0
    assert pd.isna(table.data[0][0]) and [r[2] for r in table.data] == [True, False]
