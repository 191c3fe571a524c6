"""Run lmms-eval with the ``zoo_prune`` model and check that it produced its results.

    results = run_lmms_eval({"pretrained": "models/testbed-llava", "method": "zoo", "keep": 64, "m": 64, "h": 0.01},
                            ["testbed"], "outputs/lmms_eval/zoo-64")

builds and runs ``python -m lmms_eval --model zoo_prune ...`` (``accelerate launch -m lmms_eval``
with ``num_processes`` > 1), streams its output to the console and ``output_dir/lmms_eval.log``,
and returns the results JSON it wrote. A run counts as done only if a results JSON newer than the
run exists and holds every requested task: lmms-eval can exit 0 after a failure. Otherwise
:class:`LmmsEvalError` names the command, the exit code, the missing file or tasks and the log.
:func:`run_lmms_eval_series` runs several model settings on the same tasks in one lmms-eval process
(lmms-eval's ``--config`` with a list of runs), each checked the same way: a sweep pays the imports once.

Resume: with ``use_cache`` (default) each answer is stored as soon as it exists, under
``DEFAULT_CACHE`` (outside ``output_dir``), keyed on the model arguments and a hash of the weights
(see ``zoo_prune.integrations.lmms_eval``); a killed run started again reuses them.

Interruption: lmms-eval runs in its own process group. An exception in the caller (Ctrl-C, or the
pipeline's SIGTERM handler) stops the whole group (SIGTERM, SIGKILL after 10 s); on Linux the child
also gets SIGTERM if the caller dies, even by SIGKILL (``PR_SET_PDEATHSIG``), so nothing is orphaned.

CLI: ``python -m zoo_prune.evaluation --model-args pretrained=DIR,method=zoo,keep=64 --tasks testbed
--output-dir outputs/lmms_eval/run [--limit N] [--dry-run]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ._process import parent_death_signal

TESTBED_TASKS = Path(__file__).resolve().parent.parent / "lmms_tasks" / "testbed"
DEFAULT_CACHE = Path("outputs/lmms_cache")
# params.yaml paper.tasks (tests/test_paper_numbers.py keeps the two equal); docs/evaluation.md says why these variants
PAPER_TASKS = ("gqa", "mmbench_en_dev_static", "mme", "pope", "scienceqa_img", "vqav2_val", "textvqa_val", "mmmu_val", "seedbench")


class LmmsEvalError(RuntimeError):
    """An lmms-eval run that did not produce its results."""


def task_documents(task: str, limit: int | None = None, include_path=None) -> list[dict]:
    """The first ``limit`` documents of lmms-eval task ``task`` as lmms-eval feeds them to a model: its own
    YAML's dataset and split, ``doc_to_visual`` (PIL images) and ``doc_to_text`` (the prompt, with the task's
    pre- and post-prompts). Returns ``[{"doc_id", "images", "text", "doc"}]``. With ``include_path`` naming a
    folder that holds ``task`` (a local copy, the rehearsal's stand-ins) only that folder is indexed."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    local = include_path is not None and any(Path(include_path).rglob(f"{task}.yaml"))
    manager = TaskManager(include_path=None if include_path is None else str(include_path), include_defaults=not local)
    if task not in manager.all_tasks:
        raise ValueError(f"lmms-eval task {task!r} not found" + (f" (include_path {str(include_path)!r})" if include_path else ""))
    found = get_task_dict([task], manager)[task]
    docs = found.test_docs() if found.has_test_docs() else found.validation_docs()
    count = len(docs) if limit is None else min(limit, len(docs))
    return [{"doc_id": i, "images": found.doc_to_visual(docs[i]), "text": found.doc_to_text(docs[i]), "doc": docs[i]}
            for i in range(count)]


def format_model_args(model_args: dict) -> str:
    """``{"pretrained": p, "keep": 64}`` -> ``pretrained=p,keep=64`` (None values dropped)."""
    if not model_args or "pretrained" not in model_args:
        raise ValueError(f"model_args needs 'pretrained' (a folder or hub id), got {model_args!r}")
    parts = []
    for key, value in model_args.items():
        if value is None:
            continue
        text = str(value)
        if any(c in text for c in ",= ") or not text:
            raise ValueError(f"model_args[{key!r}] = {value!r}: lmms-eval cannot pass empty values or ',', '=', ' '")
        parts.append(f"{key}={text}")
    return ",".join(parts)


def lmms_eval_command(model_args: dict, tasks: list[str], output_dir, *, limit: int | float | None = None,
                      include_path=TESTBED_TASKS, use_cache: bool | str | os.PathLike = True,
                      num_processes: int = 1, device: str | None = None, batch_size: int = 1) -> list[str]:
    """The exact lmms-eval command line (a list of arguments) that :func:`run_lmms_eval` runs."""
    return _command(["--model_args", format_model_args(_cached(model_args, use_cache))], tasks,
                    ["--output_path", str(output_dir)], limit=limit, include_path=include_path,
                    num_processes=num_processes, device=device, batch_size=batch_size)


def _cached(model_args: dict, use_cache) -> dict:
    """``model_args`` with the resume cache (``use_cache``: True = :data:`DEFAULT_CACHE`, a folder, or off)."""
    model_args = dict(model_args)
    if use_cache:
        model_args["resume_cache"] = str(DEFAULT_CACHE if use_cache is True else use_cache)
    return model_args


def _command(model: list[str], tasks: list[str], output: list[str], *, limit, include_path, num_processes: int, device,
             batch_size: int) -> list[str]:
    """The launcher and lmms-eval's arguments: ``model`` (``--model_args ...``, or ``--config FILE`` listing several
    runs) and ``output`` (``--output_path DIR``, or nothing when the config names each run's)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    # with an include_path, only its tasks are indexed (lmms_eval_cli); else lmms-eval's CLI as it is
    module = "lmms_eval" if include_path is None else "zoo_prune.integrations.lmms_eval_cli"
    if num_processes == 1:
        launcher = [sys.executable, "-m", module]
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        # a free port per launch (accelerate's default 29500 is taken by any other entry already running on this
        # machine: pipeline.gpus runs one per group of GPUs)
        launcher = [accelerate, "launch", f"--num_processes={num_processes}", "--main_process_port=0", "-m", module]
        if device == "cpu":  # N CPU processes (accelerate's MULTI_CPU: gloo); without both, accelerate starts one process
            launcher = ["env", "ACCELERATE_USE_CPU=1", *launcher[:2], "--multi_gpu", *launcher[2:]]
    command = launcher + ["--model", "zoo_prune", *model, "--tasks", ",".join(tasks), "--batch_size", str(batch_size),
                          *output, "--log_samples"]
    if include_path is not None:
        command += ["--include_path", str(include_path)]
    if device is not None:
        command += ["--device", device]
    if limit is not None:
        command += ["--limit", str(limit)]
    return command


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the process that started it dies, even by SIGKILL."""
    parent_death_signal(signal.SIGTERM)


def child_group() -> dict:
    """Popen arguments: the child leads its own process group (so :func:`stop_group` reaches everything it
    starts, ``accelerate`` workers included) and, on Linux, gets SIGTERM if this process dies."""
    if os.name != "posix":
        return {}
    return {"process_group": 0, "preexec_fn": _die_with_parent}


def stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the child's process group, SIGKILL after ``grace`` seconds; wait for the child."""
    if os.name != "posix":
        process.terminate()
        return
    for signum, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue


def find_results(output_dir, since: float = 0.0) -> Path | None:
    """The newest ``*_results.json`` under ``output_dir`` written after ``since`` (a time.time())."""
    found = [p for p in Path(output_dir).glob("**/*_results.json") if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_lmms_eval(model_args: dict, tasks: list[str], output_dir, limit: int | float | None = None,
                  include_path=TESTBED_TASKS, use_cache: bool | str | os.PathLike = True, dry_run: bool = False,
                  num_processes: int = 1, device: str | None = None, cwd=None, batch_size: int = 1) -> dict:
    """Run lmms-eval on ``tasks`` with ``zoo_prune`` and ``model_args``; return its results JSON.

    Args:
        model_args: the ``--model_args`` of ``zoo_prune``: ``pretrained`` and ``method``, ``keep``,
            ``m``, ``h``, ``seed``, ``estimator``, ... plus backend arguments (``device_map``, ``dtype``).
        tasks: lmms-eval task or group names (``["testbed"]``, or the paper's ``PAPER_TASKS``).
        output_dir: lmms-eval's ``--output_path``; the run's log goes to ``output_dir/lmms_eval.log``.
        limit: samples per task (testing only).
        include_path: folder of extra task YAMLs (the testbed's by default); None for hub tasks only.
        use_cache: store each answer for resuming (True: under ``DEFAULT_CACHE``; or a folder); False: off.
        dry_run: print and return ``{"command": [...]}`` without running anything.
        num_processes: GPUs (``accelerate launch`` data parallelism when > 1).
        device: lmms-eval's ``--device`` (``cpu``, ``cuda``); its default when None.
        batch_size: documents per ``generate`` call (``zoo_prune``'s LLaVA backend batches; answers
            equal batch size 1's).
        cwd: working directory of the run (the testbed YAMLs read ``data/testbed`` relative to it).
    """
    command = lmms_eval_command(model_args, tasks, output_dir, limit=limit, include_path=include_path,
                                use_cache=use_cache, num_processes=num_processes, device=device, batch_size=batch_size)
    if dry_run:
        print(shlex.join(command), flush=True)
        return {"command": command}
    output_dir = Path(cwd or ".") / output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    returncode, tail = _execute(command, output_dir / "lmms_eval.log", cwd)
    return _checked(output_dir, tasks, start, returncode, command, output_dir / "lmms_eval.log", tail)


def run_lmms_eval_series(runs: dict[str, dict], tasks: list[str], output_dir, limit: int | float | None = None,
                         include_path=TESTBED_TASKS, use_cache: bool | str | os.PathLike = True, num_processes: int = 1,
                         device: str | None = None, cwd=None, batch_size: int = 1) -> dict[str, dict]:
    """Several runs of ``tasks`` in ONE lmms-eval process: lmms-eval's own ``--config`` with a list of runs
    (each its ``model_args`` and ``output_path``), so the imports and the task index are paid once (a sweep).

    ``runs`` maps a run's name to its ``model_args`` (as :func:`run_lmms_eval` takes them); run ``name``
    writes ``output_dir/name``; the list of runs is ``output_dir/lmms_eval_runs.yaml``, the log
    ``output_dir/lmms_eval.log``. Returns ``{name: results JSON}``, each checked as :func:`run_lmms_eval`
    checks its one (lmms-eval goes on after a failed run of the list and exits 0: the missing results name it).
    Every other argument is :func:`run_lmms_eval`'s, shared by the runs.
    """
    import yaml

    if not runs or any(not isinstance(name, str) or not name or "/" in name for name in runs):
        raise ValueError(f"runs must map non-empty names without '/' to model_args, got {list(runs)!r}")
    folder = Path(cwd or ".") / output_dir
    folder.mkdir(parents=True, exist_ok=True)
    configs = [{"model_args": format_model_args(_cached(args, use_cache)), "output_path": str(Path(output_dir) / name)}
               for name, args in runs.items()]
    config = Path(output_dir) / "lmms_eval_runs.yaml"
    (folder / "lmms_eval_runs.yaml").write_text(yaml.safe_dump(configs, sort_keys=False, width=1000))
    command = _command(["--config", str(config)], tasks, [], limit=limit, include_path=include_path,
                       num_processes=num_processes, device=device, batch_size=batch_size)
    start = time.time()
    returncode, tail = _execute(command, folder / "lmms_eval.log", cwd)
    return {name: _checked(folder / name, tasks, start, returncode, command, folder / "lmms_eval.log", tail)
            for name in runs}


def _execute(command: list[str], log_path: Path, cwd) -> tuple[int, collections.deque]:
    """Run ``command`` in its own process group, its output streamed to the console and ``log_path``;
    (exit code, last lines). An exception here (Ctrl-C, SIGTERM) stops the whole group."""
    tail = collections.deque(maxlen=30)
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    with open(log_path, "w") as log, subprocess.Popen(command, cwd=cwd, **pipe, **child_group()) as process:
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                log.write(line)
                tail.append(line)
        except BaseException:  # interrupted: stop lmms-eval too (its stored answers stay for the next run)
            stop_group(process)
            raise
    return process.wait(), tail


def _checked(output_dir: Path, tasks: list[str], start: float, returncode: int, command: list[str], log_path: Path,
             tail) -> dict:
    """The results JSON of a run into ``output_dir`` (newer than ``start``, every task in it), or
    :class:`LmmsEvalError` naming the command, the exit code, the problem and the log."""
    results_path = find_results(output_dir, since=start)
    problem = None
    if results_path is None:
        problem = f"no results JSON (*_results.json) newer than the run under {output_dir}"
    else:
        results = json.loads(results_path.read_text())
        done = set(results.get("results", {})) | set(results.get("groups", {}))
        missing = [t for t in tasks if t not in done]
        if missing:
            problem = f"{results_path} has no results for task(s) {missing}"
    if problem or returncode != 0:
        raise LmmsEvalError(
            f"lmms-eval failed (exit code {returncode}): {problem or 'non-zero exit'}\n"
            f"command: {shlex.join(command)}\nlog: {log_path}\nlast lines:\n{''.join(tail)}"
        )
    results["results_path"] = str(results_path)
    return results


def main(argv=None) -> None:
    from lmms_eval.utils import simple_parse_args_string

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-args", required=True, help="pretrained=DIR_OR_HUB_ID,method=zoo,keep=64,m=64,h=0.01")
    parser.add_argument("--tasks", default="testbed", help="comma-separated lmms-eval tasks or groups")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--limit", type=float)
    parser.add_argument("--include-path", default=str(TESTBED_TASKS), help="task YAML folder ('' for none)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="resume cache folder ('' to disable)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--device")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # `kill` / `timeout` stop lmms-eval too
    limit = int(args.limit) if args.limit is not None and args.limit.is_integer() else args.limit
    try:
        results = run_lmms_eval(simple_parse_args_string(args.model_args), args.tasks.split(","), args.output_dir,
                                limit=limit, include_path=args.include_path or None, use_cache=args.cache or False,
                                dry_run=args.dry_run, num_processes=args.num_processes, device=args.device)
    except (ValueError, LmmsEvalError) as error:
        sys.exit(f"error: {error}")
    if not args.dry_run:
        print(f"results: {results['results_path']}")


if __name__ == "__main__":
    main()
