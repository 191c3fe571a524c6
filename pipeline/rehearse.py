"""``make rehearse``: the paper profile end to end on CPU stand-ins, through DVC, before a GPU hour is spent.

    python -m pipeline.rehearse                 # everything below (~15 min on 2 cores)
    python -m pipeline.rehearse --params-only   # only write rehearsal/params.yaml and rehearsal/plan.yaml

The rehearsal is a second folder of the same pipeline: ``rehearsal/dvc.yaml`` links to ``paper/dvc.yaml``,
and ``rehearsal/params.yaml`` is ``paper/params.yaml`` with the keys of ``rehearsal/overrides.yaml`` set (the
ones a user shrinks a run with: documents per task, budgets, methods per model, seeds, device, the
stand-ins' folders and task names). Stand-ins: ``zoo_prune.rehearsal.checkpoints`` (tiny random-weight
checkpoints of the real classes and geometry, in models/standins) and ``zoo_prune.rehearsal.tasks`` (small
local datasets read through lmms-eval's own task YAMLs, in data/standins). Every page and figure of its
report (rehearsal/report) says RANDOM-WEIGHT REHEARSAL.

Steps, each printed with its time; the checks end in ``rehearsal/checks/summary.md``:

1. stand-ins (built once; kept while their generator is unchanged), params and plan;
2. ``dvc repro rehearsal/dvc.yaml`` with one stand-in moved away (``--absent``, default llava-1.5-13b): its
   entries record the skip by name and the others run (check: skip records name it, the others have scores);
3. the stand-in back, ``dvc repro`` again: only that model's entries and what reads them run (check);
4. 2 evaluation processes (``accelerate launch``; on CPU its MULTI_CPU mode, each process answering its share
   of the documents) give the same answers and scores as 1 (check, on one entry);
5. an evaluation killed (SIGKILL) half-way and run again reuses the finished answers (check: counts printed
   from the resume cache's own report).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .schema import load_yaml, merge

HEADER = ("# Written by `python -m pipeline.rehearse` from paper/params.yaml and rehearsal/overrides.yaml: do not edit\n"
          "# (edit those). The paper profile on CPU stand-ins; `dvc repro rehearsal/dvc.yaml` runs it.\n")
FOLDER = Path("rehearsal")
CHECKS = FOLDER / "checks"
MODELS, DATA = Path("models/standins"), Path("data/standins")
STAGE = re.compile(r"^Running stage '(?:[^:']*:)?([^']+)'")


def write_params(paper="paper/params.yaml", overrides=FOLDER / "overrides.yaml", out=FOLDER / "params.yaml") -> Path:
    """``out`` = ``paper`` with ``overrides``' keys set (mappings merge key by key), on the same base params."""
    paper_raw, over = load_yaml(paper) or {}, load_yaml(overrides) or {}
    params = {"base": paper_raw["base"], "profile": paper_raw["profile"]}
    for key in ("wandb", "paper"):
        params[key] = merge(paper_raw.get(key, {}), over.get(key, {}))
    out = Path(out)
    out.write_text(HEADER + yaml.safe_dump(params, sort_keys=False, width=120))
    return out


def variant(folder: Path, **paper) -> Path:
    """A check's own profile folder: rehearsal/params.yaml with ``paper`` keys set and ``paper.dir`` = ``folder``
    (its own outputs, plan and resume cache), so a check never reuses the main run's answers."""
    from . import plan

    raw = load_yaml(FOLDER / "params.yaml")
    raw["base"] = os.path.relpath(Path("params.yaml").resolve(), folder.resolve())
    raw["paper"] = merge(raw["paper"], {"dir": str(folder), **paper})
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False, width=120))
    plan.write(path)
    return path


# ---------------------------------------------------------------- steps


class Steps:
    """Prints each step with its time; collects the checks' lines for the summary."""

    def __init__(self):
        self.start, self.lines, self.failed = time.monotonic(), [], []

    def step(self, title: str) -> None:
        print(f"\n=== rehearse [{self.elapsed()}] {title}", flush=True)

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"{seconds // 60:d}:{seconds % 60:02d}"

    def check(self, name: str, ok: bool, detail: str) -> None:
        line = f"- {'PASS' if ok else 'FAIL'} {name}: {detail}"
        print(line, flush=True)
        self.lines.append(line)
        if not ok:
            self.failed.append(name)


def build_standins(params: dict) -> None:
    """Stand-in checkpoints and tasks, rebuilt only when missing or written by another generator version."""
    from zoo_prune.rehearsal import checkpoints, tasks

    models = list(params["paper"]["models"])
    manifest = MODELS / "standins.json"
    have = json.loads(manifest.read_text())["models"] if manifest.exists() else []
    hidden = [m for m in models if (MODELS / f".{m}.away").exists()]
    for name in hidden:  # an earlier rehearsal stopped half-way: put it back
        (MODELS / f".{name}.away").rename(MODELS / name)
    if set(have) != set(models) or not all((MODELS / m / "config.json").exists() for m in models):
        checkpoints.build_standins(MODELS, models, overwrite=True)
    wanted = [t.removesuffix(tasks.SUFFIX) for t in params["paper"]["tasks"]]
    task_manifest = DATA / "manifest.json"
    built = json.loads(task_manifest.read_text())["tasks"] if task_manifest.exists() else {}
    if set(built) != set(wanted):
        tasks.build_standins(DATA, wanted, overwrite=True)


def dvc_repro(log: Path) -> list[str]:
    """``dvc repro rehearsal/dvc.yaml``, its output shown and kept in ``log``; the stages it ran."""
    log.parent.mkdir(parents=True, exist_ok=True)
    ran = []
    with open(log, "w") as sink:
        process = subprocess.Popen(["dvc", "repro", str(FOLDER / "dvc.yaml")], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            sink.write(line)
            if (found := STAGE.match(line)):
                ran.append(found[1])
                print(f"  {found[1]}", flush=True)
            elif line.startswith(("ERROR", "error:")):
                print(f"  {line.rstrip()}", flush=True)
        if process.wait() != 0:
            raise SystemExit(f"error: dvc repro {FOLDER / 'dvc.yaml'} failed (exit {process.returncode}); its output: {log}")
    return ran


def check_skip(steps: Steps, params: dict, absent: str, ran: list[str]) -> None:
    from . import _paper, plan

    entries = plan.build(params)
    outputs = _paper.outputs_dir(params) / "evaluate"
    skipped = [f for f in sorted((outputs / absent).glob("*")) if _paper.skipped(f)]
    named = all(_paper.skipped(f)["model"] == absent and absent in _paper.skipped(f)["stage"] for f in skipped)
    expected = [i["run"] for g in entries if g.startswith("evaluate") for i in entries[g].values() if i["model"] == absent]
    others = [i for g in entries if g.startswith("evaluate") for i in entries[g].values() if i["model"] != absent]
    scored = [i for i in others if (outputs / i["model"] / i["run"] / "scores.json").exists()]
    report = _paper.outputs_dir(params).parent / "report"
    mentioned = any(absent in p.read_text() for p in report.rglob("*.md")) if report.exists() else False
    steps.check("a missing stand-in is skipped by name, the others run",
                len(skipped) == len(expected) and named and len(scored) == len(others) and mentioned,
                f"{absent}: {len(skipped)}/{len(expected)} entries wrote skipped.json naming it; the other models: "
                f"{len(scored)}/{len(others)} entries scored; the report names it: {mentioned}; "
                f"{len(ran)} stages ran")


def check_appears(steps: Steps, params: dict, absent: str, ran: list[str]) -> None:
    from . import _paper

    outputs = _paper.outputs_dir(params) / "evaluate" / absent
    evaluate = [s for s in ran if s.startswith("evaluate")]
    own = all(absent in s for s in evaluate)
    scored = [f for f in outputs.glob("*") if (f / "scores.json").exists()]
    steps.check("a stand-in that appears reruns only its own entries", own and evaluate and len(scored) == len(evaluate),
                f"{len(evaluate)} evaluate entries ran, all of {absent}: {own}; now scored: {len(scored)}; "
                f"downstream: {[s for s in ran if not s.startswith(('evaluate', 'checkpoints'))]}")


def evaluate_command(params: Path, model: str, method: str, keep, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.evaluate", "--params", str(params), "--paper-model", model,
            "--method", method, "--keep", str(keep), "--out", str(out)]


def check_two_processes(steps: Steps, params: dict, model: str, method: str, keep) -> None:
    """The same entry with ``paper.num_processes: 2`` (``accelerate launch``) against the main run's (one process)."""
    import pandas as pd

    from . import _paper

    folder = CHECKS / "two-processes"
    path = variant(folder, num_processes=2)
    subprocess.run(evaluate_command(path, model, method, keep, folder / "out"), check=True)
    one = _paper.outputs_dir(params) / "evaluate" / model / f"{method}-{keep}"
    keys = ["task", "doc_id"]
    a = pd.read_csv(one / "samples.csv").sort_values(keys, ignore_index=True)
    b = pd.read_csv(folder / "out" / "samples.csv").sort_values(keys, ignore_index=True)
    same_answers = a[keys + ["prediction"]].astype(str).equals(b[keys + ["prediction"]].astype(str))
    scores = json.loads((one / "scores.json").read_text()), json.loads((folder / "out" / "scores.json").read_text())
    log = (folder / "out" / "lmms_eval" / "lmms_eval.log").read_text()
    ranks = {int(r): int(c) for r, c in re.findall(r"resume cache \(rank (\d+)\): \d+ answers reused, (\d+) computed", log)}
    steps.check("2 evaluation processes give the same results as 1",
                same_answers and scores[0] == scores[1] and len(ranks) == 2 and all(ranks.values()),
                f"{model} {method}-{keep}: answers computed per process {ranks}; {len(b)} answers identical to the "
                f"one-process entry's: {same_answers}; scores identical: {scores[0] == scores[1]} ({len(scores[0])} tasks)")


def stored_answers(cache: Path) -> int:
    count = 0
    for db in cache.rglob("*.db"):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
            count += connection.execute("SELECT count(*) FROM responses").fetchone()[0]
    return count


def check_kill_resume(steps: Steps, model: str, method: str, keep, total: int) -> None:
    """Start an entry, SIGKILL it once some answers are stored, run it again: the stored ones are reused."""
    folder = CHECKS / "kill-resume"
    path = variant(folder)
    cache = folder / "cache"
    command = evaluate_command(path, model, method, keep, folder / "out")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while process.poll() is None and stored_answers(cache) < total // 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    killed = process.poll() is None
    if killed:
        os.killpg(process.pid, signal.SIGKILL)  # a crash: no clean-up in the stage (its lmms-eval child dies with it)
    process.wait()
    time.sleep(2)
    before = stored_answers(cache)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    log = (folder / "out" / "lmms_eval" / "lmms_eval.log").read_text()
    counts = [tuple(map(int, m)) for m in re.findall(r"resume cache \(rank \d+\): (\d+) answers reused, (\d+) computed", log)]
    reused, computed = (sum(c[0] for c in counts), sum(c[1] for c in counts)) if counts else (0, 0)
    steps.check("a killed evaluation reuses its finished answers", killed and reused == before > 0 and reused + computed == total,
                f"killed after {before} of {total} answers were stored; the rerun reused {reused} and computed {computed}")


def main(argv=None) -> None:
    from . import plan
    from .schema import load

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params-only", action="store_true", help="write rehearsal/params.yaml and its plan, run nothing")
    p.add_argument("--absent", default="llava-1.5-13b", help="the stand-in moved away for the first run (skip check)")
    p.add_argument("--no-checks", action="store_true", help="only the DVC run (all stand-ins present)")
    args = p.parse_args(argv)
    steps = Steps()
    path = write_params()
    plan.write(path)
    if args.params_only:
        return
    params = load(path)
    models = params["paper"]["models"]
    if args.absent not in models:
        raise SystemExit(f"error: --absent {args.absent!r} is not one of the rehearsal's models {list(models)}")
    steps.step("stand-ins (models/standins, data/standins)")
    build_standins(params)
    if args.no_checks:
        steps.step("dvc repro rehearsal/dvc.yaml")
        dvc_repro(CHECKS / "dvc.log")
        return
    steps.step(f"dvc repro rehearsal/dvc.yaml with the {args.absent} stand-in moved away")
    away = MODELS / f".{args.absent}.away"
    (MODELS / args.absent).rename(away)
    try:
        ran = dvc_repro(CHECKS / "dvc-without-one.log")
    finally:
        away.rename(MODELS / args.absent)
    check_skip(steps, params, args.absent, ran)
    steps.step(f"dvc repro rehearsal/dvc.yaml with {args.absent} back")
    ran = dvc_repro(CHECKS / "dvc-all.log")
    check_appears(steps, params, args.absent, ran)
    entry = ("llava-1.5-7b", "zoo", models["llava-1.5-7b"]["budgets"][0])
    steps.step("2 evaluation processes against 1")
    check_two_processes(steps, params, *entry)
    steps.step("kill and resume")
    total = len(params["paper"]["tasks"]) * params["paper"]["limit"]
    check_kill_resume(steps, *entry, total)
    summary = ["# Rehearsal checks (RANDOM-WEIGHT REHEARSAL: stand-ins, plumbing only)", "",
               f"Done in {steps.elapsed()} (min:s). Report: rehearsal/report/README.md.", "", *steps.lines, ""]
    CHECKS.mkdir(parents=True, exist_ok=True)
    (CHECKS / "summary.md").write_text("\n".join(summary))
    steps.step(f"done: {CHECKS / 'summary.md'}, report in rehearsal/report")
    print("\n".join(steps.lines))
    if steps.failed:
        raise SystemExit(f"error: rehearsal check(s) failed: {steps.failed}")


if __name__ == "__main__":
    main()
