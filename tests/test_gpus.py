"""pipeline.gpus: GPU groups, which stages a worker takes, two real `dvc repro -s` at once in one workspace (each
with its own CUDA_VISIBLE_DEVICES), and the tool end to end with a stand-in `dvc` on PATH: every stale stage once,
on its worker's GPUs, a failure named while the others run, the final repro only after success, a clean stop."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from pipeline_helpers import ROOT, paper_params

from pipeline import gpus

DVC = shutil.which("dvc")


def test_gpu_groups_split_the_gpus_into_workers_of_num_processes():
    assert gpus.gpu_groups("0,1,2,3") == ["0", "1", "2", "3"]
    assert gpus.gpu_groups("0,1,2,3", 2) == ["0,1", "2,3"]
    assert gpus.gpu_groups(" 3, 1 ", 1) == ["3", "1"]
    assert gpus.gpu_groups("GPU-8f2e,GPU-11aa", 2) == ["GPU-8f2e,GPU-11aa"]  # UUIDs are CUDA_VISIBLE_DEVICES values too
    for bad, per_entry, message in [("0,1,2", 2, "3 GPUs do not split into workers of paper.num_processes = 2"),
                                    ("0,1,0", 1, r"names GPU \['0'\] more than once"), ("", 1, "give GPU indices"),
                                    ("0,,1", 1, "give GPU indices"), ("0,1", 0, "int >= 1")]:
        with pytest.raises(ValueError, match=message):
            gpus.gpu_groups(bad, per_entry)


def test_the_queue_holds_the_gpu_stages_not_up_to_date_long_ones_first():
    plan = {"models": {"a": {}, "b": {}}, "evaluate_unpruned": {"a": {}, "b": {}}, "evaluate_zoo": {"a-zoo-64": {}},
            "evaluate_baseline": {"b-divprune-64": {}}, "evaluate_seeds": {}}
    assert gpus.candidates(plan) == ["sweep_h", "sweep_m", "evaluate_unpruned@a", "evaluate_unpruned@b",
                                     "evaluate_zoo@a-zoo-64", "evaluate_baseline@b-divprune-64", "sensitivity@a",
                                     "sensitivity@b", "proxy"]
    status = {"p/dvc.yaml:proxy": [], "p/dvc.yaml:evaluate_unpruned@b": [],
              "p/dvc.yaml:results": [],  # not a GPU stage
              "p/dvc.yaml:checkpoints@a": ["always changed"], "q/dvc.yaml:sweep_h": []}  # another folder's sweep
    assert gpus.stale("p/dvc.yaml", gpus.candidates(plan), status) == ["evaluate_unpruned@b", "proxy"]
    assert gpus.repro_command("p/dvc.yaml", "proxy") == ["dvc", "--wait-for-lock", "repro", "-s", "p/dvc.yaml:proxy"]


STAGE = """\
import json, os, sys, time
from pathlib import Path
# started/<item>, then wait (up to 60 s) for the other item to start: succeeds only if both run at once
item, other = sys.argv[1], {"a": "b", "b": "a"}[sys.argv[1]]
Path("started").mkdir(exist_ok=True)
Path("started", item).touch()
deadline = time.time() + 60
while not Path("started", other).exists():
    if time.time() > deadline:
        sys.exit(f"{other} never started while {item} ran")
    time.sleep(0.1)
Path("out").mkdir(exist_ok=True)
Path("out", item + ".json").write_text(json.dumps({"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""

PIPELINE = """\
stages:
  work:
    foreach: [a, b]
    do:
      cmd: python stage.py ${item}
      deps: [stage.py]
      outs: ["out/${item}.json"]
"""


@pytest.mark.skipif(DVC is None, reason="dvc not installed")
def test_two_real_dvc_workers_run_at_once_in_one_workspace_each_on_its_gpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    subprocess.run([DVC, "init", "--no-scm", "-q"], check=True)
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text(PIPELINE)
    pool = gpus.Pool("dvc.yaml", ["0", "1"], tmp_path / "logs", dvc=DVC)
    outcomes = pool.run(["work@a", "work@b"])
    logs = {o.stage: o.log.read_text() for o in outcomes}
    assert [o.code for o in outcomes] == [0, 0], logs
    ran_on = {o.stage.removeprefix("work@"): o.gpus for o in outcomes}
    assert sorted(ran_on.values()) == ["0", "1"]
    for item, group in ran_on.items():  # the stage saw its worker's GPU
        assert json.loads((tmp_path / "out" / f"{item}.json").read_text()) == {"cuda_visible_devices": group}
    status = subprocess.run([DVC, "status", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}  # both recorded in dvc.lock
    assert {"work@a", "work@b"} <= set(yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"])


FAKE_DVC = """\
#!{python}
# A stand-in `dvc`: records each call (argv, CUDA_VISIBLE_DEVICES, pid) in $FAKE_DVC_RECORD; `status` prints
# $FAKE_DVC_STATUS; `repro -s` waits until two have started (so two workers ran at once), fails for
# $FAKE_DVC_FAIL, or with FAKE_DVC_MODE=sleep sleeps until SIGINT (then records it).
import json, os, signal, sys, time
from pathlib import Path

record = Path(os.environ["FAKE_DVC_RECORD"])
args = sys.argv[1:]


def note(event):
    with open(record, "a") as sink:
        sink.write(json.dumps({{"event": event, "argv": args, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
                               "pid": os.getpid()}}) + "\\n")


if "status" in args:
    print(os.environ["FAKE_DVC_STATUS"])
    sys.exit(0)
note("start")
if "-s" in args:
    if os.environ.get("FAKE_DVC_MODE") == "sleep":
        signal.signal(signal.SIGINT, lambda *a: (note("interrupted"), sys.exit(255)))
        time.sleep(120)
        sys.exit(0)
    deadline = time.time() + 30
    while sum(1 for line in record.read_text().splitlines() if '"-s"' in line) < 2 and time.time() < deadline:
        time.sleep(0.05)
    if args[-1].endswith(":" + os.environ.get("FAKE_DVC_FAIL", "-")):
        print("ERROR: failed to reproduce " + args[-1] + ": the stage said no")
        sys.exit(255)
"""


@pytest.fixture
def fake(tmp_path):
    """A paper-profile folder (LLaVA-1.5-7B only, 2 GPUs per entry), a stand-in dvc first on PATH, its record."""
    params = paper_params(tmp_path / "paper", tmp_path / "absent", models=["llava-1.5-7b"], num_processes=2)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text(FAKE_DVC.format(python=sys.executable))
    (bin_dir / "dvc").chmod(0o755)
    dvcfile = f"{tmp_path / 'paper'}/dvc.yaml"
    stale = ["sweep_h", "evaluate_unpruned@llava-1.5-7b", "evaluate_zoo@llava-1.5-7b-zoo-64", "proxy"]
    status = {f"{dvcfile}:{s}": [] for s in stale} | {f"{dvcfile}:results": []}
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FAKE_DVC_RECORD": str(tmp_path / "calls.jsonl"), "FAKE_DVC_STATUS": json.dumps(status),
           "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return {"params": params, "dvcfile": dvcfile, "stale": stale, "env": env, "record": tmp_path / "calls.jsonl"}


def calls(record):
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def tool(fake, *extra):
    return [sys.executable, "-m", "pipeline.gpus", "--params", str(fake["params"]), "--gpus", "0,1,2,3", *extra]


def test_each_stale_stage_runs_once_on_its_workers_gpus_and_a_failure_is_named(fake):
    env = {**fake["env"], "FAKE_DVC_FAIL": "evaluate_zoo@llava-1.5-7b-zoo-64"}
    run = subprocess.run(tool(fake), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    made = calls(fake["record"])
    dvcfile = fake["dvcfile"]
    assert made[0]["argv"] == ["--wait-for-lock", "repro", f"{dvcfile}:checkpoints"]  # the records first
    stages = [c for c in made[1:] if c["event"] == "start"]
    assert sorted(c["argv"][-1] for c in stages) == sorted(f"{dvcfile}:{s}" for s in fake["stale"])  # each once
    assert all(c["argv"][:4] == ["--wait-for-lock", "repro", "-s", c["argv"][-1]] for c in stages)
    assert {c["cvd"] for c in stages} == {"0,1", "2,3"}  # paper.num_processes = 2: two workers of two GPUs
    assert len({c["pid"] for c in stages}) == len(stages)
    out = run.stdout + run.stderr
    assert "FAILED evaluate_zoo@llava-1.5-7b-zoo-64 on GPU" in out and "the stage said no" in out
    assert "3 of 4 stages done" in out and "1 stage(s) failed" in out
    assert not any(c["argv"] == ["--wait-for-lock", "repro", dvcfile] for c in made)  # no final repro after a failure


def test_after_success_the_rest_runs_once_on_the_first_worker(fake):
    run = subprocess.run(tool(fake), env=fake["env"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    made = calls(fake["record"])
    assert made[-1]["argv"] == ["--wait-for-lock", "repro", fake["dvcfile"]] and made[-1]["cvd"] == "0,1"
    assert "4 of 4 stages done" in run.stdout
    dry = subprocess.run(tool(fake, "--dry-run"), env=fake["env"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert dry.returncode == 0 and len(calls(fake["record"])) == len(made)  # status only: nothing ran
    assert f"dvc --wait-for-lock repro -s {fake['dvcfile']}:proxy" in dry.stdout


def test_sigterm_stops_every_running_stage_and_names_them(fake):
    env = {**fake["env"], "FAKE_DVC_MODE": "sleep"}
    process = subprocess.Popen(tool(fake, "--grace", "20"), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while sum(c["event"] == "start" and "-s" in c["argv"] for c in calls(fake["record"])) < 2:
        assert time.monotonic() < deadline and process.poll() is None, process.stdout.read() if process.poll() else ""
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, out
    made = calls(fake["record"])
    started = [c for c in made if c["event"] == "start" and "-s" in c["argv"]]
    interrupted = [c for c in made if c["event"] == "interrupted"]
    assert len(started) == 2 and {c["pid"] for c in interrupted} == {c["pid"] for c in started}  # SIGINT reached both
    for c in started:
        with pytest.raises(ProcessLookupError):
            os.kill(c["pid"], 0)
    summary = [line for line in out.splitlines() if line.startswith(("stopped ", "not started: "))]
    assert sorted(line.split()[1] for line in summary if line.startswith("stopped ")) == sorted(fake["stale"][:2])
    assert summary[-1] == f"not started: {', '.join(fake['stale'][2:])}" and "0 of 4 stages done" in out
