"""The paper profile's GPU stages spread over the GPUs of one machine: one DVC worker per GPU, one workspace.

    python -m pipeline.gpus --params paper/params.yaml --gpus 0,1,2,3      # make paper GPUS=0,1,2,3
    python -m pipeline.gpus --params paper/params.yaml --gpus 0,1 --dry-run   # what would run where; runs nothing

Steps:

1. ``dvc repro <paper.dir>/dvc.yaml:checkpoints``: every model's checkpoint record (never downloads);
2. ``dvc status --json``: which GPU stages are not up to date: the plan's evaluate entries, the sweeps,
   ``sensitivity@<model>`` and ``proxy`` (the stages that need only the checkpoints);
3. one worker per GPU group of ``paper.num_processes`` GPUs (``--gpus 0,1,2,3`` with 2 processes per entry:
   workers on ``0,1`` and ``2,3``), each taking the next stage from one queue (sweeps and unpruned entries
   first: the longest) and running ``CUDA_VISIBLE_DEVICES=<group> dvc --wait-for-lock repro -s <stage>``, its
   output in ``<paper.dir>/logs/<stage>.log``. A failed stage is named at the end; the others go on;
4. when every one succeeded: ``dvc --wait-for-lock repro <paper.dir>/dvc.yaml`` on the first group: efficiency
   (timed with the other GPUs idle), results, ablation, report and anything still out of date.

Ctrl-C or SIGTERM: no stage starts any more; each running one gets SIGINT, as Ctrl-C in its own terminal would
(the stage removes its temporary folder and stops lmms-eval; DVC exits without recording it), then SIGKILL after
``--grace`` seconds (a second Ctrl-C: at once). The answers computed so far stay in ``<paper.dir>/cache/lmms``, so
the same command later resumes: finished stages are up to date, an interrupted entry reuses its answers.

Why this works in one workspace (checked with DVC 3.67 on the rehearsal; docs/pipeline.md "Several GPUs"):
``dvc repro`` releases the repository lock while a stage's command runs and holds a lock per path instead (its
dependencies read, its outputs written, ``.dvc/tmp/rwlock``), so entries with disjoint outputs run side by side and
each is recorded in ``dvc.lock``. ``-s``: without it every repro also reruns the entry's upstream
``checkpoints@<model>`` (always changed), which a running entry reads: "... is busy", and that repro fails.
``--wait-for-lock``: when a command ends DVC takes the repository lock again to record the outputs; without the
flag it gives up after 3 s if another worker holds it ("Unable to acquire lock") and the finished entry is not recorded.
``CUDA_VISIBLE_DEVICES`` is not a param: an entry's record is the same on whichever GPU it ran.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

EVALUATE_GROUPS = ("evaluate_unpruned", "evaluate_zoo", "evaluate_baseline", "evaluate_seeds")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def gpu_groups(gpus: str, per_entry: int = 1) -> list[str]:
    """``"0,1,2,3"`` with 2 GPUs per entry -> ``["0,1", "2,3"]``: the CUDA_VISIBLE_DEVICES of each worker."""
    ids = [g.strip() for g in gpus.split(",")]
    if not gpus.strip() or not all(ids):
        raise ValueError(f"--gpus {gpus!r}: give GPU indices (or UUIDs) separated by commas, e.g. 0,1,2,3")
    repeated = sorted({g for g in ids if ids.count(g) > 1})
    if repeated:
        raise ValueError(f"--gpus {gpus!r} names GPU {repeated} more than once")
    if isinstance(per_entry, bool) or not isinstance(per_entry, int) or per_entry < 1:
        raise ValueError(f"GPUs per entry must be an int >= 1, got {per_entry!r}")
    if len(ids) % per_entry:
        raise ValueError(f"--gpus {gpus!r}: {len(ids)} GPUs do not split into workers of paper.num_processes = "
                         f"{per_entry} GPUs each")
    return [",".join(ids[i:i + per_entry]) for i in range(0, len(ids), per_entry)]


def candidates(plan: dict) -> list[str]:
    """The GPU stages a worker may run, in queue order (the long ones first): the sweeps, every evaluate entry
    of the plan (unpruned, ZOO-Prune, baselines, seeds), then ``sensitivity@<model>`` and ``proxy``."""
    names = ["sweep_h", "sweep_m"]
    for group in EVALUATE_GROUPS:
        names += [f"{group}@{key}" for key in plan.get(group, {})]
    return names + [f"sensitivity@{model}" for model in plan.get("models", {})] + ["proxy"]


def stale(dvcfile: str, names: list[str], status: dict) -> list[str]:
    """The names (in their order) that ``dvc status --json <dvcfile>`` lists as not up to date."""
    return [n for n in names if f"{dvcfile}:{n}" in status]


def dvc_status(dvcfile: str, dvc: str = "dvc") -> dict:
    result = subprocess.run([dvc, "--wait-for-lock", "status", "--json", dvcfile], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`dvc status --json {dvcfile}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return json.loads(result.stdout or "{}")


def repro_command(dvcfile: str, stage: str | None = None, dvc: str = "dvc", single: bool = True) -> list[str]:
    target = dvcfile if stage is None else f"{dvcfile}:{stage}"
    return [dvc, "--wait-for-lock", "repro", *(["-s"] if single and stage else []), target]


@dataclass
class Outcome:
    stage: str
    gpus: str
    code: int | None  # None: not finished (stopped)
    seconds: float
    log: Path


@dataclass
class Pool:
    """Workers, one per GPU group, taking stages from one queue; each stage is one ``dvc repro -s`` process
    (its own session, so a terminal's Ctrl-C reaches this process only, which passes it on)."""

    dvcfile: str
    groups: list[str]
    logs: Path
    dvc: str = "dvc"
    grace: float = 60.0
    progress: object = None  # a tqdm bar (or None)
    outcomes: list[Outcome] = field(default_factory=list)
    stopping: float | None = None  # monotonic time of the first stop request
    signum: int | None = None  # the signal that asked for it
    _running: dict = field(default_factory=dict)  # pid -> Popen
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, message: str) -> None:
        (self.progress.write if self.progress is not None else print)(message)

    def run(self, stages: list[str]) -> list[Outcome]:
        """Run ``stages`` over the groups; return when all ended or, after :meth:`stop`, when the running ones did."""
        todo: queue.Queue = queue.Queue()
        for name in stages:
            todo.put(name)
        self.logs.mkdir(parents=True, exist_ok=True)
        workers = [threading.Thread(target=self._work, args=(group, todo), daemon=True) for group in self.groups]
        for worker in workers:
            worker.start()
        killed = False
        while any(w.is_alive() for w in workers):
            for worker in workers:
                worker.join(timeout=0.2)
            if self.stopping is not None and not killed and time.monotonic() - self.stopping > self.grace:
                self._signal(signal.SIGKILL)
                killed = True
        return self.outcomes

    def stop(self, signum: int | None = None) -> None:
        """No new stage; SIGINT to the running ones (the first time), SIGKILL (a second time)."""
        if self.stopping is None:
            self.stopping, self.signum = time.monotonic(), signum
            self.say(f"stopping: no new stage; SIGINT to {len(self._running)} running, "
                     f"SIGKILL after {self.grace:.0f} s")
            self._signal(signal.SIGINT)
        else:
            self.say("stopping now: SIGKILL")
            self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        with self._lock:
            for pid in list(self._running):
                try:
                    os.killpg(pid, signum)
                except ProcessLookupError:
                    pass

    def _work(self, group: str, todo: queue.Queue) -> None:
        while self.stopping is None:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                return
            self._one(name, group)

    def _one(self, name: str, group: str) -> None:
        log = self.logs / f"{name}.log"
        command = repro_command(self.dvcfile, name, self.dvc)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": group}
        start = time.monotonic()
        with self._lock:
            if self.stopping is not None:
                return
            with open(log, "w") as sink:  # the child keeps its own descriptor
                sink.write(f"$ CUDA_VISIBLE_DEVICES={group} {' '.join(command)}\n")
                sink.flush()
                process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
            self._running[process.pid] = process
        self.say(f"[gpu {group}] {name}: started (log {log})")
        code = process.wait()
        with self._lock:
            self._running.pop(process.pid, None)
        seconds = time.monotonic() - start
        finished = code == 0 or self.stopping is None
        self.outcomes.append(Outcome(name, group, code if finished else None, seconds, log))
        state = "done" if code == 0 else (f"FAILED (exit {code})" if finished else f"stopped (exit {code})")
        self.say(f"[gpu {group}] {name}: {state} after {duration(seconds)}")
        if self.progress is not None:
            self.progress.update()


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def last_error(log: Path) -> str:
    """What went wrong, from a stage's log: the stage's own ``error:`` line, else DVC's last ``ERROR``."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    stage = [line for line in lines if line.startswith("error:")]
    dvc = [line for line in lines if line.startswith("ERROR")]
    return (stage or dvc or lines or [""])[-1].strip()


def summary(outcomes: list[Outcome], stages: list[str]) -> list[str]:
    done = [o for o in outcomes if o.code == 0]
    failed = [o for o in outcomes if o.code not in (0, None)]
    stopped = [o for o in outcomes if o.code is None]
    started = {o.stage for o in outcomes}
    lines = [f"{len(done)} of {len(stages)} stages done"]
    lines += [f"FAILED {o.stage} on GPU {o.gpus} (exit {o.code}, log {o.log}): {last_error(o.log)}" for o in failed]
    lines += [f"stopped {o.stage} on GPU {o.gpus} (log {o.log})" for o in stopped]
    lines += [f"not started: {', '.join(s for s in stages if s not in started)}"] if len(started) < len(stages) else []
    return lines


def main(argv=None) -> None:
    from tqdm import tqdm

    from . import plan as plans
    from .schema import ParamsError, load

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="paper/params.yaml", help="a paper-profile params file")
    p.add_argument("--gpus", required=True, help="GPUs of this machine, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES values)")
    p.add_argument("--dry-run", action="store_true", help="print the workers and the stages; run nothing "
                   "(the status is that of the checkpoint records as they are)")
    p.add_argument("--stages", action="append", metavar="GLOB", help="only the GPU stages matching this pattern "
                   "(repeatable; e.g. 'evaluate_*@llava-1.5-7b-*'); implies --no-downstream")
    p.add_argument("--no-downstream", action="store_true", help="only the GPU stages; not the final dvc repro")
    p.add_argument("--grace", type=float, default=60.0, help="seconds a stopped stage gets before SIGKILL (default 60)")
    args = p.parse_args(argv)
    try:
        params = load(args.params, ["profile", "paper", "ablation"])
        if params["profile"] != "paper":
            raise ParamsError(f"--params {args.params}: profile {params['profile']!r}; this tool runs a paper-profile "
                              "params file (paper/params.yaml, rehearsal/params.yaml)")
        plans.check(args.params, params)
        groups = gpu_groups(args.gpus, params["paper"]["num_processes"])
    except (ParamsError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    dvc = shutil.which("dvc")
    if dvc is None:
        raise SystemExit("error: no `dvc` on PATH (activate the project's environment)")
    folder = Path(params["paper"]["dir"])
    dvcfile = str(folder / "dvc.yaml")
    names = candidates(plans.build(params))
    if args.stages:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in args.stages)]
        if not names:
            raise SystemExit(f"error: --stages {args.stages} match none of the GPU stages: "
                             f"{candidates(plans.build(params))}")
        args.no_downstream = True
    print(f"workers: {len(groups)} ({', '.join(f'CUDA_VISIBLE_DEVICES={g}' for g in groups)}; "
          f"paper.num_processes = {params['paper']['num_processes']} GPU(s) per stage)", flush=True)
    if not args.dry_run:
        print(f"$ {' '.join(repro_command(dvcfile, 'checkpoints', 'dvc', single=False))}", flush=True)
        if subprocess.run(repro_command(dvcfile, "checkpoints", dvc, single=False)).returncode != 0:
            raise SystemExit(f"error: the checkpoint records failed: see above (`dvc repro {dvcfile}:checkpoints`)")
    try:
        todo = stale(dvcfile, names, dvc_status(dvcfile, dvc))
    except RuntimeError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{len(todo)} of {len(names)} GPU stages not up to date", flush=True)
    final = repro_command(dvcfile, dvc="dvc", single=False)
    if args.dry_run:
        for name in todo:
            print(f"  {' '.join(repro_command(dvcfile, name))}")
        if not args.no_downstream:
            print(f"then on CUDA_VISIBLE_DEVICES={groups[0]}: {' '.join(final)}")
        return
    with tqdm(total=len(todo), unit="stage", desc="GPU stages", dynamic_ncols=True) as bar:
        pool = Pool(dvcfile, groups, folder / "logs", dvc=dvc, grace=args.grace, progress=bar)
        handlers = {s: signal.signal(s, lambda signum, frame: pool.stop(signum)) for s in STOP_SIGNALS}
        try:
            outcomes = pool.run(todo)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    lines = summary(outcomes, todo)
    print("\n".join(lines), flush=True)
    if pool.stopping is not None:
        raise SystemExit(128 + (pool.signum or signal.SIGINT))
    if any(o.code != 0 for o in outcomes):
        raise SystemExit(f"error: {sum(o.code != 0 for o in outcomes)} stage(s) failed (named above); fix and run the "
                         "same command again (the others are up to date and skipped)")
    if args.no_downstream:
        return
    print(f"$ CUDA_VISIBLE_DEVICES={groups[0]} {' '.join(final)}", flush=True)
    code = subprocess.run([dvc, *final[1:]], env={**os.environ, "CUDA_VISIBLE_DEVICES": groups[0]}).returncode
    if code != 0:
        raise SystemExit(f"error: `{' '.join(final)}` failed (exit {code})")


if __name__ == "__main__":
    main()
