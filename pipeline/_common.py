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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROFILES = ("testbed", "paper")
log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A stage cannot run: a bad parameter, a missing input, an unreachable checkpoint."""


# ---------------------------------------------------------------- params


def load_params(path="params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise StageError(f"params file {str(path)!r} not found (run from the repository root or pass --params)")
    return yaml.safe_load(path.read_text()) or {}


def sections(params: dict, names: list[str]) -> dict:
    """``{name: params[name]}`` for a stage's sections; names a missing one."""
    missing = [n for n in names if n not in params]
    if missing:
        raise StageError(f"params has no section(s) {missing}; it has {sorted(params)}")
    return {n: params[n] for n in names}


def need(section: dict, name: str, key: str, kind=None, choices=None):
    """``section[key]``, checked: present, of ``kind``, in ``choices``; errors name ``name.key`` and the value."""
    if key not in section:
        raise StageError(f"params {name}.{key} is missing")
    value = section[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        raise StageError(f"params {name}.{key} = {value!r} must be {getattr(kind, '__name__', kind)}")
    if choices is not None and value not in choices:
        raise StageError(f"params {name}.{key} = {value!r}; choose one of {list(choices)}")
    return value


def checkpoint_reachable(name: str) -> bool:
    """A local folder, or a hub id already in the Hugging Face cache (the hub itself is never asked)."""
    if Path(name).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def check_profile(params: dict) -> str:
    """The profile; for ``paper``, raise unless every paper checkpoint is reachable (before any output)."""
    profile = need(params, "params", "profile", str, PROFILES)
    if profile == "paper":
        models = params.get("paper", {}).get("models", {})
        missing = [spec["pretrained"] for spec in models.values() if not checkpoint_reachable(spec["pretrained"])]
        if missing or not models:
            raise StageError(
                f"profile 'paper' needs the checkpoints {missing or '(none listed in params paper.models)'}, which are not "
                "reachable here (no local folder, not in the Hugging Face cache; set HF_HOME or download them on a GPU "
                "machine). Nothing was written. To see the lmms-eval commands it would run: "
                "python -m pipeline.evaluate --profile paper --dry-run")
    return profile


# ---------------------------------------------------------------- outputs


def tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def publish(tmp: Path, final: Path) -> None:
    """Move a finished temporary file or folder into place (replacing what was there)."""
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    elif final.exists():
        final.unlink()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(final)


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

        payload = {f"table/{k}": wandb.Table(dataframe=v.reset_index(drop=True)) for k, v in (tables or {}).items()}
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
    """The common CLI: --params, --profile, the ``inputs`` (--model, --data, --runs) and, for a stage
    ``name``, its outputs --out outputs/<name>, --metrics outputs/metrics/<name>.json, --figures outputs/figures/<name>."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--profile", choices=PROFILES, help="override params' profile")
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
def stage(name: str, args: argparse.Namespace, section_names: list[str], outputs: list[str] = (),
          testbed_only: bool = True):
    """Run one stage: params and profile checked, outputs written to temp siblings, published on success.

    ``outputs`` are names of ``args`` attributes holding output paths (files or folders); inside the
    block ``s.out[name]`` is the temporary path to write instead. ``testbed_only`` stages refuse the
    paper profile (only evaluate runs the paper's checkpoints so far).
    """
    setup_logging()
    tmp = {}
    tracker = None
    start = time.perf_counter()
    try:
        params = load_params(args.params)
        if getattr(args, "profile", None):
            params["profile"] = args.profile
        profile = check_profile(params)
        if testbed_only and profile != "testbed":
            raise StageError(f"stage {name} is implemented for the testbed profile only (profile {profile!r}); "
                             "the paper profile runs the evaluate stages")
        own = sections(params, section_names)
        for key in outputs:
            final = Path(getattr(args, key))
            tmp[key] = tmp_sibling(final)
            shutil.rmtree(tmp[key], ignore_errors=True)
            final.parent.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(name, {"profile": profile, **own}, params.get("wandb", {}))
        s = Stage(name, args, own, profile, out=dict(tmp), tracker=tracker)
        log.info("stage %s (profile %s) started", name, profile)
        yield s
        for key, path in tmp.items():
            if not path.exists():
                raise StageError(f"stage {name} did not write its output {getattr(args, key)}")
            publish(path, Path(getattr(args, key)))
        tracker.log(metrics={"stage_seconds": time.perf_counter() - start})
        tracker.finish(failed=False)
        log.info("stage %s done in %.1f s", name, time.perf_counter() - start)
    except BaseException as error:
        for path in tmp.values():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        if tracker is not None:
            tracker.finish(failed=True)
        if isinstance(error, KeyError):
            raise SystemExit(f"error: stage {name}: params key {error} is missing (see params.yaml)") from error
        if isinstance(error, (StageError, ValueError, TypeError, FileNotFoundError)):
            raise SystemExit(f"error: stage {name}: {error}") from error
        raise


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
