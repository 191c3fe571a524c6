"""What every pipeline stage shares: params, the profile check, atomic outputs, W&B tracking, the CLI.

A stage script is ``main(argv)`` that calls :func:`stage` once::

    def main(argv=None):
        with stage("sensitivity", argv, ["zoo", "sensitivity", "budgets"], outputs=["out"]) as s:
            ...                     # s.params: the stage's sections; s.args; s.out["out"]: a temp folder
            s.log(metrics={...}, tables={"agreement": df}, images={"overlays": path})

Outputs are written into temporary siblings and renamed into place only when the stage succeeds,
so a failing stage (bad param, missing input) leaves nothing half-written; the error is printed as
``error: stage <name>: <message>`` and the exit status is 1.

W&B: one run per stage (project and group from ``params.wandb``, ``job_type`` = the stage, the
stage's params as config). ``WANDB_MODE`` decides: unset -> ``online`` if ``WANDB_API_KEY`` is
set, else ``offline`` (runs under ``$WANDB_DIR/wandb``, default ``./wandb``, git-ignored; upload
later with ``wandb sync wandb/offline-run-*``); ``disabled`` -> no run and no files at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A stage cannot run: a bad parameter, a missing input, an unreachable checkpoint."""


# ---------------------------------------------------------------- params


def load_params(path="params.yaml", sections=None) -> dict:
    """params.yaml with ``sections`` (default: all) checked against :mod:`pipeline.schema`; errors name
    the key path and the value."""
    from .schema import load

    path = Path(path)
    if not path.exists():
        raise StageError(f"params file {str(path)!r} not found (run from the repository root or pass --params)")
    return load(path, sections)


def sections(params: dict, names: list[str]) -> dict:
    """``{name: params[name]}`` for a stage's sections."""
    return {n: params[n] for n in names}


def plan_digest(params: dict) -> str:
    """A digest of what the paper profile's plan is a function of (``pipeline.plan.build``): its models, methods,
    seeds and Table 5's model and variants. ``pipeline.plan`` writes it into the plan file."""
    import hashlib

    paper = params["paper"]
    keys = {"models": paper["models"], "methods": paper["methods"], "seeds": paper["seeds"],
            "ablation": [paper["ablation"]["model"], params["ablation"]["variants"]]}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def profile_of(params_path) -> str:
    """The profile a params file names, read before the stage starts (its command line and outputs depend
    on it); ``testbed`` when the file cannot be read, so that the stage itself names the problem."""
    from .schema import ParamsError, read

    try:
        return read(params_path).get("profile", "testbed")
    except (ParamsError, OSError, AttributeError):
        return "testbed"


def check_profile(params: dict, params_path) -> str:
    """The profile. Under ``paper`` the folder's plan (``<paper.dir>/plan.yaml``, the entries DVC runs) must be
    the one the params ask for; each stage then looks for its own model's checkpoint (an absent one is
    skipped by name, never the others)."""
    profile = params["profile"]
    if profile == "paper":
        import yaml

        path = Path(params["paper"]["dir"]) / "plan.yaml"
        written = (yaml.safe_load(path.read_text()) or {}).get("digest") if path.exists() else None
        if written != plan_digest(params):
            raise StageError(f"{path} is {'missing' if not path.exists() else 'stale'}: it does not list the entries params "
                             f"{params_path} ask for; run `python -m pipeline.plan {params_path}` "
                             f"(then `dvc repro {path.parent}/dvc.yaml`)")
    return profile


# ---------------------------------------------------------------- outputs
#
# A stage writes into ``<root>/outputs/.tmp/<stage>.<pid>/`` (root: the folder of the params file,
# the repository root under DVC), outside every tracked output and dependency, and moves each
# finished output into place only when the whole stage succeeded. A stage stopped by a signal
# removes its folder; one killed hard (SIGKILL) leaves it, and the next stage to start removes every
# such folder whose process is gone. With DVC's ``persist: true`` (dvc.yaml) DVC no longer deletes
# the previous outputs before the command, so a failed or killed stage leaves them as they were.

TMP = Path("outputs") / ".tmp"


def tmp_root(args) -> Path:
    return Path(getattr(args, "params", "params.yaml")).resolve().parent / TMP


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(root: Path) -> list[Path]:
    """Remove the temporary folders under ``root`` whose stage process is gone (a hard kill); return them."""
    removed = []
    for folder in sorted(root.glob("*.*")) if root.is_dir() else []:
        pid = folder.name.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            log.info("removed %s, left by a stage that was killed", folder)
    return removed


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(tmp: Path, final: Path) -> None:
    """Move a finished temporary file or folder into place (replacing what was there)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = tmp.with_name(tmp.name + ".old")
    if final.exists() or final.is_symlink():
        try:
            os.rename(final, old)  # the previous output leaves only when the new one is complete
        except OSError:  # another file system: remove it
            remove_tree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.move(str(tmp), str(final))
    remove_tree(old)


def write_json(path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return path


def trained(model_dir) -> bool:
    """A model folder written by ``zoo_prune.testbed.train`` has a training log; anything else is random weights."""
    return (Path(model_dir) / "training_log.json").exists()


def weights_note(model_dir) -> str:
    """'' for a trained testbed model, else the warning every figure from it carries on its face."""
    return "" if trained(model_dir) else f"RANDOM WEIGHTS ({model_dir} has no training_log.json): plumbing check, not a result"


# ---------------------------------------------------------------- W&B


def wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode not in ("online", "offline", "disabled", "dryrun", "run"):
        raise StageError(f"WANDB_MODE={mode!r}; use online, offline or disabled")
    return mode


def wandb_frame(frame):
    """``frame`` as a W&B table accepts it: W&B types a column by its first rows and refuses a later row of another
    type (a column of None and text, of numbers and pd.NA), so mixed object columns become text ('' for missing) and
    nullable numbers floats (NaN for missing)."""
    import pandas as pd

    frame = frame.reset_index(drop=True).copy()
    for column in frame.columns:
        if pd.api.types.is_extension_array_dtype(frame[column]) and pd.api.types.is_numeric_dtype(frame[column]):
            frame[column] = frame[column].astype("float64")  # nullable integers: pd.NA -> NaN
        elif frame[column].dtype == object or pd.api.types.is_extension_array_dtype(frame[column]):
            frame[column] = frame[column].map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
    return frame


class Tracker:
    """One W&B run (or nothing when disabled): metrics, tables, images. ``name`` "evaluate/zoo-16" is
    job type "evaluate", run name "<group>/evaluate/zoo-16"."""

    def __init__(self, name: str, params: dict, wandb_params: dict):
        self.run = None
        mode = wandb_mode()
        if mode == "disabled":
            return
        import wandb

        directory = Path(os.environ.get("WANDB_DIR", "."))
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=wandb_params.get("project", "zoo-prune"), group=wandb_params.get("group"),
                              job_type=name.split("/")[0], name=f"{wandb_params.get('group') or 'run'}/{name}", config=params,
                              mode=mode, dir=str(directory), reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def log(self, metrics: dict | None = None, tables: dict | None = None, images: dict | None = None) -> None:
        if self.run is None:
            return
        import wandb

        payload = {f"table/{k}": wandb.Table(dataframe=wandb_frame(v)) for k, v in (tables or {}).items()}
        payload |= {f"figure/{k}": wandb.Image(str(p)) for k, p in (images or {}).items()}
        if payload:
            self.run.log(payload)
        for key, value in (metrics or {}).items():
            self.run.summary[key] = value

    def finish(self, failed: bool) -> None:
        if self.run is not None:
            import wandb

            self.run.finish(exit_code=1 if failed else 0)
            wandb.teardown()  # wait until the run's files are complete on disk


# ---------------------------------------------------------------- the stage context


@dataclass
class Stage:
    name: str
    args: argparse.Namespace
    params: dict
    profile: str
    out: dict = field(default_factory=dict)  # output name -> temporary path to write
    tracker: Tracker | None = None

    def log(self, metrics=None, tables=None, images=None) -> None:
        """Send metrics (run summary), tables (DataFrames) and figures (PNG paths; a temp path is fine) to W&B."""
        self.tracker.log(metrics, tables, images)


def parser(description: str, name: str | None = None, inputs=("model", "data")) -> argparse.ArgumentParser:
    """The common CLI: --params, the ``inputs`` (--model, --data, --runs) and, for a stage
    ``name``, its outputs --out outputs/<name>, --metrics outputs/metrics/<name>.json, --figures outputs/figures/<name>."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml",
                   help="params file (default: params.yaml, the testbed; paper/params.yaml: the paper profile)")
    defaults = {"model": "models/testbed-llava", "data": "data/testbed", "runs": "outputs/evaluate"}
    for key in inputs:
        p.add_argument(f"--{key}", default=defaults[key])
    if name:
        p.add_argument("--out", default=f"outputs/{name}")
        p.add_argument("--metrics", default=f"outputs/metrics/{name}.json")
        p.add_argument("--figures", default=f"outputs/figures/{name}")
    return p


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=False)


@contextlib.contextmanager
def stage(name: str, args: argparse.Namespace, section_names: list[str], outputs: list[str] = ()):
    """Run one stage: params and profile checked, outputs written to temp siblings, published on success.

    ``outputs`` are names of ``args`` attributes holding output paths (files or folders); inside the
    block ``s.out[name]`` is the temporary path to write instead. Under the paper profile the stage's
    sections include ``paper`` (its models, tasks and device).
    """
    setup_logging()
    tmp, run_dir = {}, None
    tracker, unwatch = None, None
    start = time.perf_counter()
    previous = stop_on_signals()
    try:
        params = load_params(args.params, ["profile", "wandb", *section_names])
        if params["profile"] == "paper" and "paper" not in section_names:
            params = load_params(args.params, ["profile", "wandb", "paper", *section_names])
        profile = check_profile(params, args.params)
        own = sections(params, section_names)
        if profile == "testbed":
            check_inputs(args)
        root = tmp_root(args)
        remove_stale(root)
        if outputs:
            run_dir = root / f"{name.replace('/', '-')}.{os.getpid()}"
            run_dir.mkdir(parents=True)
        for key in outputs:
            tmp[key] = run_dir / key
        tracker = Tracker(name, {"profile": profile, **own}, params.get("wandb", {}))
        s = Stage(name, args, own, profile, out=dict(tmp), tracker=tracker)
        unwatch = watch_parents()
        log.info("stage %s (profile %s) started", name, profile)
        yield s
        missing = [getattr(args, key) for key, path in tmp.items() if not path.exists()]
        if missing:
            raise StageError(f"stage {name} did not write its output(s) {missing}")
        for key, path in tmp.items():
            publish(path, Path(getattr(args, key)))
        tracker.log(metrics={"stage_seconds": time.perf_counter() - start})
        tracker.finish(failed=False)
        log.info("stage %s done in %.1f s", name, time.perf_counter() - start)
    except BaseException as error:
        if tracker is not None:
            tracker.finish(failed=True)
        if isinstance(error, (Stopped, KeyboardInterrupt)):
            signum = error.signum if isinstance(error, Stopped) else signal.SIGINT
            print(f"error: stage {name}: stopped by {signal.Signals(signum).name}; the previous outputs are kept "
                  "(answers computed so far stay in the resume cache)", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum) from None
        if isinstance(error, KeyError):
            raise SystemExit(f"error: stage {name}: params key {error} is missing (see params.yaml)") from error
        if isinstance(error, (StageError, ValueError, TypeError, FileNotFoundError)):
            raise SystemExit(f"error: stage {name}: {error}") from error
        raise
    finally:
        if unwatch is not None:
            unwatch()
        if run_dir is not None:
            remove_tree(run_dir)
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()  # outputs/.tmp itself, when empty
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------- signals


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived (``kill``, a closed terminal, DVC gone): unwind, clean up, stop children."""

    def __init__(self, signum: int):
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def stop_on_signals() -> dict:
    """SIGTERM / SIGHUP raise :class:`Stopped` in the main thread (SIGINT raises KeyboardInterrupt already),
    so ``finally`` blocks run: temporary files go, child processes are stopped. Returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGTERM, signal.SIGHUP)}


def watch_parents(interval: float = 0.5):
    """Stop this stage (SIGTERM to itself) when its parent, or the ``dvc`` process that runs it, is gone;
    returns the function that ends the watch (called when the stage ends).

    ``kill <dvc pid>`` ends DVC alone (it neither starts its command in a new process group nor forwards
    SIGTERM): without this the stage and its lmms-eval child would run on, and publish outputs DVC never
    records. On Linux the kernel signals the death of the parent (``PR_SET_PDEATHSIG``, no thread); a
    polling thread covers a ``dvc`` that is not the direct parent (a shell in between) and other systems.
    """
    from zoo_prune._process import parent_death_signal

    parent = os.getppid()
    watched = []
    if os.environ.get("DVC_STAGE"):
        import psutil

        with contextlib.suppress(psutil.Error):
            watched = [p for p in psutil.Process().parents() if "dvc" in " ".join(p.cmdline()[:3])][:1]
    kernel = parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # died before the kernel was asked
        os.kill(os.getpid(), signal.SIGTERM)
    stop = threading.Event()
    if not kernel or any(p.pid != parent for p in watched):

        def watch():
            while not stop.wait(interval):
                if os.getppid() != parent or any(not p.is_running() for p in watched):
                    log.warning("the process that started this stage is gone: stopping")
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

        threading.Thread(target=watch, name="watch-parents", daemon=True).start()

    def end():
        stop.set()
        if kernel:
            parent_death_signal(0)

    return end


# ---------------------------------------------------------------- inputs


def check_inputs(args) -> None:
    """The stage's model and data folders (``--model``, ``--data``) are complete, before any work."""
    from .inputs import check_data, check_model

    if getattr(args, "model", None):
        check_model(args.model)
    if getattr(args, "data", None):
        check_data(args.data)


def limit_threads() -> None:
    """Respect OMP_NUM_THREADS in torch too (torch otherwise takes every core)."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def load_model(model_dir):
    """(LLaVA model in eval mode, processor) from a folder; names a missing one."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    limit_threads()
    if not (Path(model_dir) / "config.json").exists():
        raise StageError(f"model folder {str(model_dir)!r} not found (no config.json); run the train stage or pass --model")
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    return model, AutoProcessor.from_pretrained(str(model_dir))


def load_rows(data_dir, family: str, limit: int, split: str = "test", offset: int = 0):
    """Questions ``offset`` to ``offset + limit`` of a testbed task (``zoo_prune.testbed.dataset.load_split``)."""
    from zoo_prune.testbed.dataset import load_split

    if not (Path(data_dir) / "tasks").exists():
        raise StageError(f"testbed data {str(data_dir)!r} not found; run the data stage (python -m pipeline.data)")
    rows = load_split(data_dir, f"tasks/{family}", split)
    if offset + limit > len(rows):
        raise StageError(f"task {family!r} has {len(rows)} {split} questions; {offset} + {limit} asked for")
    return rows.select(range(offset, offset + limit))
