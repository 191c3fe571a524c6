"""Faults: a killed stage keeps the previous results, leaves no temporary folder after the next start,
orphans no child, and the rerun reuses the lmms-eval answers already computed; corrupt inputs are named
with the command that restores them; the content fingerprint of the resume cache; DVC plans that never
run ``train`` on a fresh clone."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline import inputs
from pipeline_helpers import ROOT, make_workspace, small_params, write_params
from zoo_prune import fingerprint

PREVIOUS = {"testbed_attribute": 0.123}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("faults"))
    write_params(root, small_params(**{"evaluate.limit": 2}))  # 5 tasks x 2 questions = 10 answers
    return root


def env(root: Path) -> dict:
    return os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                         "ZOO_PRUNE_FINGERPRINTS": str(root / "fingerprints.json"),
                         "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                         "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


SLOW_GENERATE = """
import os, time
if os.environ.get("SLOW_GENERATE"):  # test only: each answer takes this many more seconds, so a kill lands mid-run
    import transformers.generation.utils as utils
    generate = utils.GenerationMixin.generate
    def slow(self, *args, **kwargs):
        time.sleep(float(os.environ["SLOW_GENERATE"]))
        return generate(self, *args, **kwargs)
    utils.GenerationMixin.generate = slow
"""


def start_evaluate(root: Path, slow: float = 0.0) -> subprocess.Popen:
    """The evaluate stage in a subprocess; ``slow`` > 0 adds seconds to every answer of its lmms-eval child."""
    hooks = root / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SLOW_GENERATE)
    command = [sys.executable, "-m", "pipeline.evaluate", "--params", "params.yaml", "--method", "zoo", "--keep", "16",
               "--model", "model"]
    environment = env(root)
    if slow:
        environment |= {"SLOW_GENERATE": str(slow), "PYTHONPATH": f"{hooks}{os.pathsep}{environment['PYTHONPATH']}"}
    return subprocess.Popen(command, cwd=root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def answers_stored(root: Path) -> int:
    total = 0
    for db in (root / "outputs" / "lmms_cache").glob("*/rank_0.db"):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            try:
                total += con.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            except sqlite3.OperationalError:  # the table is being created
                pass
    return total


def wait_for(condition, timeout=240.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def alive(processes) -> list:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def kill_when(root, process, signum, condition, what):
    """Send ``signum`` to the stage once ``condition()`` holds; return its children at that moment."""
    stage = psutil.Process(process.pid)

    def ready():
        if process.poll() is not None:
            raise AssertionError(f"the stage ended before {what}:\n{process.communicate()[0][-3000:]}")
        return condition() and stage.children(recursive=True)

    wait_for(ready, what=what)
    children = stage.children(recursive=True)
    process.send_signal(signum)
    output = process.communicate(timeout=60)[0]
    wait_for(lambda: not alive(children), timeout=30, what="the stage's children to stop")
    return output


def test_killed_stage_keeps_previous_outputs_and_resumes(workspace):
    root = workspace
    out, metrics = root / "outputs/evaluate/zoo-16", root / "outputs/metrics/evaluate/zoo-16.json"
    out.mkdir(parents=True)
    (out / "scores.json").write_text(json.dumps(PREVIOUS))
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps(PREVIOUS))
    tmp = root / "outputs" / ".tmp"

    def previous_intact():
        assert json.loads((out / "scores.json").read_text()) == PREVIOUS
        assert json.loads(metrics.read_text()) == PREVIOUS
        assert sorted(p.name for p in out.iterdir()) == ["scores.json"]

    # 1. SIGTERM while lmms-eval starts (no answer yet)
    process = start_evaluate(root)
    output = kill_when(root, process, signal.SIGTERM, lambda: True, "lmms-eval to start")
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM; the previous outputs are kept" in output
    previous_intact()
    assert not tmp.exists() or not any(tmp.iterdir())

    # 2. SIGTERM in the middle of the answers (0.5 s each here, so the kill lands between the 2nd and the 10th)
    process = start_evaluate(root, slow=0.5)
    kill_when(root, process, signal.SIGTERM, lambda: answers_stored(root) >= 2, "2 answers")
    previous_intact()
    assert not tmp.exists() or not any(tmp.iterdir())

    # 3. SIGKILL (no clean-up possible): the lmms-eval child dies with it (PDEATHSIG), the temp folder stays
    process = start_evaluate(root, slow=0.5)
    kill_when(root, process, signal.SIGKILL, lambda: answers_stored(root) >= 5, "5 answers")
    previous_intact()
    [stale] = tmp.iterdir()
    assert stale.name == f"evaluate-zoo-16.{process.pid}"
    done = answers_stored(root)
    assert 5 <= done < 10

    # the next start removes the stale folder, reuses every stored answer and publishes complete outputs
    process = start_evaluate(root)
    wait_for(lambda: not stale.exists() or process.poll() is not None, what="the stale folder to go")
    assert not stale.exists()
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    assert f"{done} answers reused, {10 - done} computed" in output
    scores = json.loads((out / "scores.json").read_text())
    assert scores != PREVIOUS and len(scores) == 5 and json.loads(metrics.read_text()) == scores
    assert not tmp.exists()


# ---------------------------------------------------------------- corrupt or missing inputs


def copy_tree(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_truncated_weights_are_named_with_the_restore_command(workspace, tmp_path):
    model = copy_tree(workspace / "model", tmp_path / "testbed-llava")
    weights = model / "model.safetensors"
    inputs.check_model(model)  # complete
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(inputs.InputError, match=rf"{weights} is corrupt \(truncated.*`git checkout -- {model}`"):
        inputs.check_model(model)
    weights.write_bytes(b"\x05")
    with pytest.raises(inputs.InputError, match=rf"{weights} is corrupt"):
        inputs.check_model(model)


def test_missing_model_and_data_folders_are_named(tmp_path):
    with pytest.raises(inputs.InputError, match=rf"model folder '{tmp_path}/nope' not found.*git checkout -- {tmp_path}/nope"):
        inputs.check_model(tmp_path / "nope")
    with pytest.raises(inputs.InputError, match=rf"testbed data '{tmp_path}/nodata' not found.*`dvc repro data`"):
        inputs.check_data(tmp_path / "nodata")


def arrow_file(data: Path) -> Path:
    return sorted((data / "tasks" / "attribute" / "test").glob("*.arrow"))[0]


def test_truncated_arrow_file_is_named(workspace, tmp_path):
    data = copy_tree(workspace / "data" / "testbed", tmp_path / "testbed")
    inputs.check_data(data)  # complete
    arrow = arrow_file(data)
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(inputs.InputError, match=rf"{arrow} is corrupt .*`dvc repro data`"):
        inputs.check_data(data)


def test_garbled_image_is_named(workspace, tmp_path):
    data = copy_tree(workspace / "data" / "testbed", tmp_path / "testbed")
    arrow = arrow_file(data)
    raw = bytearray(arrow.read_bytes())
    start = raw.index(b"IDAT") + 8  # inside the first PNG's pixel data: the file keeps its size and structure
    raw[start:start + 64] = bytes(64)
    arrow.write_bytes(bytes(raw))
    with pytest.raises(inputs.InputError, match=rf"{arrow}: the image of row 0 \('image'\) does not decode.*`dvc repro data`"):
        inputs.check_data(data)


def test_stage_with_a_corrupt_input_stops_before_work_naming_the_file(workspace, tmp_path, monkeypatch):
    from pipeline import sensitivity

    monkeypatch.setenv("WANDB_MODE", "disabled")
    model = copy_tree(workspace / "model", tmp_path / "model")
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:100])
    write_params(tmp_path, small_params())
    with pytest.raises(SystemExit, match=r"error: stage sensitivity: .*model.safetensors is corrupt.*git checkout"):
        sensitivity.main(["--params", str(tmp_path / "params.yaml"), "--model", str(model),
                          "--data", str(workspace / "data" / "testbed"), "--out", str(tmp_path / "outputs/s"),
                          "--metrics", str(tmp_path / "outputs/m.json"), "--figures", str(tmp_path / "outputs/f")])
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------- the resume cache's key


def test_fingerprint_follows_content_not_times(workspace, tmp_path):
    import hashlib

    model = copy_tree(workspace / "model", tmp_path / "model")
    sidecar = tmp_path / "fingerprints.json"
    first = fingerprint.weights_fingerprint(model, sidecar)
    # independent: sha256 of the files' bytes, by hand
    files = sorted(p for p in model.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    by_hand = hashlib.sha256(json.dumps(sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest())
                                               for p in files)).encode()).hexdigest()
    assert first == by_hand
    remembered = json.loads(sidecar.read_text())
    assert set(remembered) == {str(p.resolve()) for p in files}
    os.utime(model / "model.safetensors", ns=(1, 1))  # `touch` / checkout: same content
    assert fingerprint.weights_fingerprint(model, sidecar) == first
    weights = model / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # retrained: other content
    weights.write_bytes(bytes(raw))
    assert fingerprint.weights_fingerprint(model, sidecar) != first
    assert fingerprint.weights_fingerprint("llava-hf/llava-1.5-7b-hf", sidecar) == ""


def test_sidecar_spares_rehashing_an_unchanged_file(workspace, tmp_path, monkeypatch):
    model = copy_tree(workspace / "model", tmp_path / "model")
    sidecar = tmp_path / "fingerprints.json"
    fingerprint.weights_fingerprint(model, sidecar)
    hashed = []
    monkeypatch.setattr(fingerprint, "file_digest", lambda path: hashed.append(path.name) or "x")
    fingerprint.weights_fingerprint(model, sidecar)
    assert hashed == []
    os.utime(model / "config.json", ns=(2, 2))
    fingerprint.weights_fingerprint(model, sidecar)
    assert hashed == ["config.json"]


# ---------------------------------------------------------------- DVC on a fresh clone


def dvc(clone: Path, *args: str, check=True) -> str:
    result = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=clone, env=env(clone),
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    if check:
        assert result.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """``git clone`` of this repository (its HEAD), with tiny data made by ``dvc repro data`` (DVC 3.67's dry
    run hashes a stage's dependencies for its run cache and fails on a missing one: treeverse/dvc#9818)."""
    clone = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    for key, value in (("user.email", "test@example.org"), ("user.name", "test")):
        subprocess.run(["git", "config", key, value], cwd=clone, check=True)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["data"].update(train=4, validation=2, test=8)
    params["evaluate"]["limit"] = 1
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = dvc(clone, "repro", "data")
    assert "Running stage 'data'" in output
    subprocess.run(["git", "commit", "-qam", "tiny data"], cwd=clone, check=True)  # experiments start from a commit
    return clone


def test_forced_evaluate_never_runs_train_on_a_fresh_clone(fresh_clone):
    output = dvc(fresh_clone, "repro", "-f", "-s", "evaluate_zoo@zoo-16", "--dry")
    assert "Running stage 'evaluate_zoo@zoo-16'" in output
    assert "'train'" not in output and "'data'" not in output
    output = dvc(fresh_clone, "repro", "-f", "evaluate_zoo@zoo-16", "--dry")  # even without -s
    assert "Running stage 'train'" not in output and "Running stage 'evaluate_zoo@zoo-16'" in output


def test_experiment_never_runs_train_on_a_fresh_clone(fresh_clone):
    output = dvc(fresh_clone, "exp", "run", "-S", "zoo.h=0.1", "evaluate_zoo@zoo-16")  # one entry, 5 questions
    assert "Running stage 'evaluate_zoo@zoo-16'" in output and "Stage 'train' didn't change, skipping" in output
    assert "Running stage 'train'" not in output and "Running stage 'data'" not in output


# DVC 3.67 dry runs hash each stage's dependencies for its run cache and fail on one that does not
# exist yet (treeverse/dvc#9818); `dvc exp run --dry` also works in a temporary copy where no tracked
# output is checked out. Both plans get past `train` (frozen, skipped) and stop at the first stage
# that reads an output not on disk: these tests pin that, and will say when DVC fixes it.
def plan(output: str) -> tuple[list[str], str]:
    return re.findall(r"Running stage '([^']+)'", output), output


@pytest.mark.parametrize("command", [("repro", "--dry"), ("exp", "run", "-S", "zoo.h=0.1", "--dry")])
def test_dry_plans_skip_train_on_a_fresh_clone(fresh_clone, command):
    stages, output = plan(dvc(fresh_clone, *command, check=False))
    assert "Stage 'train' didn't change, skipping" in output and "train" not in stages
    if "ERROR" in output:  # the DVC limitation above, nothing of ours
        assert re.search(r"ERROR: failed to reproduce '[\w@.-]+': \[Errno 2\] No such file or directory", output), output


def test_sigterm_to_dvc_repro_stops_the_stage_and_lmms_eval(fresh_clone):
    """``kill <dvc pid>``: the stage notices its parent is gone, stops lmms-eval and publishes nothing."""
    lock = (fresh_clone / "dvc.lock").read_text()
    scores = fresh_clone / "outputs" / "evaluate" / "zoo-16" / "scores.json"
    before = scores.read_text() if scores.exists() else None
    dvc_bin = str(Path(sys.executable).parent / "dvc")
    process = subprocess.Popen([dvc_bin, "repro", "-f", "-s", "evaluate_zoo@zoo-16"], cwd=fresh_clone,
                               env=env(fresh_clone), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    repro = psutil.Process(process.pid)

    def lmms_eval_started():
        if process.poll() is not None:
            raise AssertionError(f"dvc repro ended first:\n{process.communicate()[0][-3000:]}")
        for child in repro.children(recursive=True):
            try:
                if "lmms_eval" in " ".join(child.cmdline()):
                    return True
            except psutil.Error:
                pass
        return False

    wait_for(lmms_eval_started, what="lmms-eval under dvc repro")
    children = repro.children(recursive=True)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    wait_for(lambda: not alive(children), timeout=30, what="the stage and lmms-eval to stop")
    assert (fresh_clone / "dvc.lock").read_text() == lock
    assert (scores.read_text() if scores.exists() else None) == before
    assert not (fresh_clone / "outputs" / ".tmp").exists()
