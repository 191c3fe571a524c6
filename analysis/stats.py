"""Statistics of the pipeline's measured outputs: plain functions, data in, numbers or tables out."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import DegenerateDataWarning, binomtest, bootstrap, spearmanr

from zoo_prune import normalize_sensitivity

# Primary metric (paper Table A), found by the metric names a task reports, so that variants and stand-ins
# (mmbench_en_dev_static, pope_standin, ...) score like their task: the first rule whose metrics are all
# there wins; a tuple is summed (MME: perception + cognition). Otherwise: the first numeric metric that is
# not a standard error (accuracy, exact_match, gpt_eval_score, mmmu_acc, seed_image come first anyway).
PRIMARY = (("mme_perception_score", "mme_cognition_score"), "pope_f1_score", "seed_image")
UNPRUNED = "unpruned"


def spearman(a, b) -> float:
    """Spearman's rho of two equal-length score vectors (NaN when either is constant or too short)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equal shapes, got {a.shape} and {b.shape}")
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def minmax(scores) -> np.ndarray:
    """Min-max normalisation as the method does it (``zoo_prune.normalize_sensitivity``: constant -> all 1)."""
    return normalize_sensitivity(torch.as_tensor(np.asarray(scores, dtype=np.float64))).numpy()


def proxy_mask(projector, threshold: float = 0.5) -> np.ndarray:
    """The tokens whose min-max normalised projector sensitivity is >= ``threshold`` (method.md section 5)."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    return minmax(projector) >= threshold


def proxy_rho(projector, encoder, threshold: float = 0.5) -> tuple[float, int]:
    """(rho, tokens kept): Spearman of projector vs encoder sensitivities over the tokens whose
    min-max normalised projector sensitivity is >= ``threshold`` (method.md section 5). The encoder's
    min-max normalisation is monotone, so rho uses its raw values: tokens outside the mask may be NaN."""
    keep = proxy_mask(projector, threshold)
    return spearman(np.asarray(projector, dtype=float)[keep], np.asarray(encoder, dtype=float)[keep]), int(keep.sum())


def agreement(samples: dict[str, list]) -> pd.DataFrame:
    """Mean (over samples) Spearman rho between every pair of estimators; ``samples[name][i]`` = sample i's scores."""
    names = list(samples)
    counts = {len(v) for v in samples.values()}
    if len(counts) != 1:
        raise ValueError(f"every estimator needs the same number of samples, got {dict((n, len(v)) for n, v in samples.items())}")
    table = pd.DataFrame(index=names, columns=names, dtype=float)
    for a in names:
        for b in names:
            table.loc[a, b] = float(np.nanmean([spearman(x, y) for x, y in zip(samples[a], samples[b])]))
    return table


def _primary(results: dict) -> dict[str, tuple[tuple[str, ...], dict]]:
    """``{task: (the primary metric's names, the task's numeric metrics)}`` (groups, which carry no score, skipped)."""
    primary = {}
    for task, entry in results["results"].items():
        metrics = {k.split(",")[0]: v for k, v in entry.items() if "," in k and "stderr" not in k
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        rule = next((r for r in PRIMARY if all(m in metrics for m in ((r,) if isinstance(r, str) else r))), None)
        if rule is not None:
            primary[task] = ((rule,) if isinstance(rule, str) else rule), metrics
        elif metrics:
            primary[task] = (next(iter(metrics)),), metrics
    if not primary:
        raise ValueError(f"no task scores in results (tasks: {list(results['results'])})")
    return primary


def task_scores(results: dict) -> dict[str, float]:
    """``{task: primary score}`` of an lmms-eval results JSON (groups, which carry no score, are skipped)."""
    return {task: float(sum(metrics[m] for m in names)) for task, (names, metrics) in _primary(results).items()}


def task_metrics(results: dict) -> dict[str, str]:
    """``{task: the primary metric's name}`` that :func:`task_scores` reads (a sum joined by ``+``: MME's
    ``mme_perception_score+mme_cognition_score``): the scale of the score is the metric's own."""
    return {task: "+".join(names) for task, (names, _) in _primary(results).items()}


def relative(scores: pd.DataFrame, unpruned: pd.Series) -> pd.DataFrame:
    """Each score divided by the unpruned model's score on the same task (NaN where that is 0)."""
    base = unpruned.reindex(scores.columns).replace(0, np.nan)
    return scores.div(base, axis=1)


def paper_table(runs: pd.DataFrame, tokens: int, order: list[str] | None = None) -> pd.DataFrame:
    """The paper's results table from long-form ``runs`` (columns method, keep, task, score).

    Rows: the unpruned model, then every method at every budget (largest first); columns: each
    task's score, its score relative to unpruned (``<task> rel``), ``Avg`` = mean relative
    score (paper Section 4 / App. C: "normalized average"; relative values are fractions) and
    ``Mean`` = mean raw score (``Avg`` overweights a task the unpruned model scores near 0 on).
    Methods appear in ``order`` (default: as first seen in ``runs``), budgets largest first.
    """
    missing = {"method", "keep", "task", "score"} - set(runs.columns)
    if missing:
        raise ValueError(f"runs needs columns method, keep, task, score; missing {sorted(missing)}")
    runs = runs.assign(tokens=runs["keep"].where(runs["method"] != UNPRUNED, tokens).astype(int))
    wide = runs.pivot_table(index=["method", "tokens"], columns="task", values="score", aggfunc="first")
    base = wide.xs(UNPRUNED, level="method") if UNPRUNED in wide.index.get_level_values("method") else None
    if base is None or len(base) != 1:
        raise ValueError(f"runs need exactly one {UNPRUNED!r} run, got {0 if base is None else len(base)}")
    rel = relative(wide, base.iloc[0])
    table = wide.copy()
    for task in wide.columns:
        table[f"{task} rel"] = rel[task]
    table["Avg"] = rel.mean(axis=1, skipna=False)
    table["Mean"] = wide.mean(axis=1, skipna=False)
    table = table[[c for t in wide.columns for c in (t, f"{t} rel")] + ["Avg", "Mean"]].reset_index()
    table.insert(2, "pruned %", 100 * (1 - table["tokens"] / tokens))
    order = {m: i for i, m in enumerate(dict.fromkeys([UNPRUNED, *(order or []), *runs["method"]]))}
    table = table.sort_values(["tokens", "method"], key=lambda c: -c if c.name == "tokens" else c.map(order))
    return table.set_index(["tokens", "method"])


def markdown_table(table: pd.DataFrame, percent_cols=(), digits: int = 1) -> str:
    """A markdown table: fractions in ``percent_cols`` (and ``* rel``, ``Avg``) as percentages."""
    shown = table.reset_index()
    for column in shown.columns:
        if column in percent_cols or str(column).endswith(" rel") or column == "Avg":
            shown[column] = shown[column].map(lambda v: "n/a" if pd.isna(v) else f"{100 * v:.{digits}f}%")
        elif pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: "n/a" if pd.isna(v) else f"{v:.3g}")
    header = "| " + " | ".join(str(c).removeprefix("testbed_") for c in shown.columns) + " |"
    rule = "|" + "---|" * len(shown.columns)
    rows = ["| " + " | ".join(map(str, row)) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


RUN_NAME = re.compile(r"^(?P<method>.+)-(?P<keep>\d+(?:\.\d+)?)(?:-seed(?P<seed>\d+))?$")  # keep: 64, or a ratio 0.2


def run_name(method: str, keep: int | None = None, seed: int | None = None) -> str:
    """Folder name of an evaluate run: ``unpruned``, ``<method>-<keep>`` (the params seed) or ``<method>-<keep>-seed<s>``."""
    if method == UNPRUNED:
        return UNPRUNED
    return f"{method}-{keep}" + ("" if seed is None else f"-seed{seed}")


def parse_run_name(name: str) -> tuple[str, int | None, int | None]:
    """(method, keep, extra seed or None) of an evaluate run folder name (inverse of :func:`run_name`)."""
    if name == UNPRUNED:
        return UNPRUNED, None, None
    found = RUN_NAME.match(name)
    if not found:
        raise ValueError(f"evaluate run folder {name!r} is not <method>-<keep>[-seed<s>] or {UNPRUNED!r}")
    seed, keep = found["seed"], found["keep"]
    return found["method"], float(keep) if "." in keep else int(keep), None if seed is None else int(seed)


def read_runs(folder, expected: list[tuple[str, int | None]] | None = None) -> pd.DataFrame:
    """Long-form (method, keep, task, score) of the main evaluate runs under ``folder``
    (``<method>-<keep>/scores.json`` and ``unpruned/scores.json``; the extra seeds' runs
    ``<method>-<keep>-seed<s>`` are :func:`read_samples`' business); names any ``expected`` run that is missing."""
    folder = Path(folder)
    records, found = [], set()
    for path in sorted(folder.glob("*/scores.json")):
        method, keep, seed = parse_run_name(path.parent.name)
        if seed is not None:
            continue
        found.add((method, keep))
        records += [{"method": method, "keep": keep, "task": t, "score": s} for t, s in json.loads(path.read_text()).items()]
    missing = [run_name(m, k) for m, k in (expected or []) if (m, k) not in found]
    if missing:
        raise FileNotFoundError(f"evaluate runs missing under {folder}: {missing} (run dvc repro evaluate)")
    runs = pd.DataFrame(records, columns=["method", "keep", "task", "score"])
    if expected is not None:
        runs = runs[[(m, None if pd.isna(k) else int(k)) in set(expected) for m, k in zip(runs["method"], runs["keep"])]]
    return runs


# ---------------------------------------------------------------- per-sample correctness and its statistics

POSITIVE = "yes"  # the positive answer of F1 tasks (existence, POPE)
SAMPLE_COLUMNS = ["task", "doc_id", "question", "target", "prediction", "correct", "metric"]


DICT_PREDICTIONS = ("parsed_pred", "pred")  # per-sample dicts whose prediction is compared with their "answer"


def lmms_samples(folder, results: dict | None = None) -> pd.DataFrame:
    """Per-sample rows (task, doc_id, question, target, prediction, correct, metric) of an lmms-eval run's
    ``*_samples_<task>.jsonl`` files under ``folder`` (written with ``--log_samples``).

    A sample's metric entry is what the task's ``process_results`` returned: for the testbed tasks
    ``(family, normalised prediction, answer)`` (``lmms_tasks/testbed/utils.py``), so ``correct`` =
    prediction equals answer and ``metric`` = ``accuracy`` or ``f1`` (F1 of "yes", scored over the
    task's rows by :func:`task_score`); a 0/1 number is taken as correctness (metric ``accuracy``).
    A dict entry counts when it carries the question's own 0/1 ``score`` (POPE, MME) or a parsed
    prediction beside its ``answer`` (MMMU's ``parsed_pred``, SEED-Bench's ``pred``); others (MMBench's,
    matched across circular options at aggregation) are left out. ``results``
    (lmms-eval's results JSON) names each task's metrics; without it, the keys ``accuracy``/``f1``.
    """
    rows = []
    for path in sorted(Path(folder).glob("**/*_samples_*.jsonl"), key=lambda p: (p.stat().st_mtime, p.name)):
        task = path.stem.split("_samples_", 1)[1]
        names = ([k.split(",")[0] for k in (results or {}).get("results", {}).get(task, {}) if "," in k and "stderr" not in k]
                 or ["accuracy", "f1"])
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            sample = json.loads(line)
            metric = next((n for n in names if n in sample), None)
            if metric is None:
                continue
            value = sample[metric]
            answer = sample.get("filtered_resps", sample.get("resps"))
            answer = answer[0] if isinstance(answer, list) and answer else answer
            if isinstance(value, list) and len(value) == 3:  # the testbed: (family, prediction, answer)
                prediction, target, correct = str(value[1]), str(value[2]), value[1] == value[2]
            elif isinstance(value, (bool, int, float)) and value in (0, 1):
                prediction, target, correct, metric = str(answer), str(sample.get("target")), bool(value), "accuracy"
            elif isinstance(value, dict) and value.get("score") in (0, 1):  # POPE's, MME's: the question's own 0/1
                prediction = str(value.get("prediction", answer))
                target = str(value.get("ground_truth", value.get("answer", sample.get("target"))))
                correct = bool(value["score"])
            elif isinstance(value, dict) and any(k in value for k in DICT_PREDICTIONS) and "answer" in value:
                prediction = str(next(value[k] for k in DICT_PREDICTIONS if k in value))  # MMMU's parsed_pred, SEED's pred
                target, correct = str(value["answer"]), prediction == str(value["answer"])
            else:
                continue
            rows.append({"task": task, "doc_id": int(sample["doc_id"]), "question": str(sample.get("input", "")),
                         "target": target, "prediction": prediction, "correct": bool(correct), "metric": metric})
    table = pd.DataFrame(rows, columns=SAMPLE_COLUMNS).drop_duplicates(["task", "doc_id"], keep="last")  # newest log wins
    return table.sort_values(["task", "doc_id"], ignore_index=True)


def _f1(true_positives, predicted, actual):
    """F1 of the positive answer from counts (arrays broadcast); 1.0 when nothing is predicted or actual
    (as ``zoo_prune.testbed.evaluate.score``)."""
    denominator = np.asarray(predicted + actual, dtype=float)
    return np.where(denominator > 0, 2 * np.asarray(true_positives, dtype=float) / np.maximum(denominator, 1), 1.0)


def task_score(rows: pd.DataFrame) -> float:
    """A task's score from its per-sample rows: accuracy = mean of ``correct``; ``f1`` = F1 of "yes"."""
    metrics = set(rows["metric"])
    if len(metrics) != 1:
        raise ValueError(f"one task's rows need one metric, got {sorted(metrics)}")
    if metrics.pop() == "f1":
        predicted, actual = rows["prediction"].eq(POSITIVE), rows["target"].eq(POSITIVE)
        return float(_f1((predicted & actual).sum(), predicted.sum(), actual.sum()))
    return float(rows["correct"].mean())


def read_samples(folder, names: list[str] | None = None) -> pd.DataFrame:
    """Every evaluate run's per-sample table (``<run>/samples.csv``) under ``folder``, with columns run,
    method, keep, seed (from the run's ``run.json``) and the sample columns; names any run in ``names`` without one."""
    folder = Path(folder)
    tables, missing = [], []
    for name in names if names is not None else sorted(p.parent.name for p in folder.glob("*/samples.csv")):
        path = folder / name / "samples.csv"
        if not path.exists():
            missing.append(name)
            continue
        info = json.loads((folder / name / "run.json").read_text()) if (folder / name / "run.json").exists() else {}
        method, keep, seed = parse_run_name(name)
        table = pd.read_csv(path, dtype={"target": str, "prediction": str, "question": str}, keep_default_na=False)
        tables.append(table.assign(run=name, method=method, keep=keep, seed=info.get("seed", seed)))
    if missing:
        raise FileNotFoundError(f"per-sample tables (samples.csv) missing under {folder} for runs {missing}: "
                                "rerun their evaluate stages (dvc repro)")
    columns = ["run", "method", "keep", "seed", *SAMPLE_COLUMNS]
    return pd.concat(tables, ignore_index=True)[columns] if tables else pd.DataFrame(columns=columns)


class _Resampler:
    """Per task, the runs' per-question outcomes as arrays over a common set of doc ids, and the
    runs' task scores for any resampling of those ids (vectorised over resamples)."""

    def __init__(self, samples: pd.DataFrame, runs: list[str]):
        self.runs, self.tasks, self.parts = list(runs), [], []
        chosen = samples[samples["run"].isin(runs)]
        chosen = chosen.assign(correct=chosen["correct"].astype(float), positive=chosen["prediction"].eq(POSITIVE).astype(float))
        for task, rows in chosen.groupby("task", sort=True):
            wide = rows.pivot_table(index="doc_id", columns="run", values=["correct", "positive"], aggfunc="first")
            absent = [r for r in runs if r not in set(rows["run"])]
            if absent:
                raise ValueError(f"task {task!r}: runs {absent} have no samples")
            if wide.isna().any().any():
                raise ValueError(f"task {task!r}: the runs answered different questions (doc ids differ); "
                                 "evaluate them with the same evaluate.limit")
            actual = rows.drop_duplicates("doc_id").set_index("doc_id").loc[wide.index, "target"].eq(POSITIVE).to_numpy()
            [metric] = set(rows["metric"])
            self.tasks.append(task)
            self.parts.append((metric, wide["correct"][runs].to_numpy(float).T, wide["positive"][runs].to_numpy(float).T,
                               actual.astype(float)))

    @property
    def sizes(self) -> dict[str, int]:
        return {t: len(p[3]) for t, p in zip(self.tasks, self.parts)}

    def scores(self, *indices) -> np.ndarray:
        """(tasks, runs, *batch) scores for doc-position arrays ``indices[t]`` of shape (*batch, n_t)."""
        out = []
        for (metric, correct, positive, actual), idx in zip(self.parts, indices):
            idx = np.asarray(idx, dtype=np.intp)
            if metric == "f1":
                tp = np.take(positive * actual, idx, axis=1).sum(-1)
                out.append(_f1(tp, np.take(positive, idx, axis=1).sum(-1), np.take(actual, idx).sum(-1)))
            else:
                out.append(np.take(correct, idx, axis=1).mean(-1))
        return np.stack(out)


def _summaries(scores: np.ndarray, base: int, references: list[int]) -> np.ndarray:
    """From (T, R, *batch) task scores: per run the task scores, Avg (mean over tasks of score / base's
    score) and Mean (mean score), stacked as (T + 2, R, *batch); then the same minus each reference run's."""
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = scores / np.where(scores[:, base:base + 1] == 0, np.nan, scores[:, base:base + 1])
    table = np.concatenate([scores, relative.mean(0, keepdims=True), scores.mean(0, keepdims=True)])
    return np.stack([table] + [table - table[:, r:r + 1] for r in references])


def paired_bootstrap(samples: pd.DataFrame, runs: list[str], base: str = UNPRUNED, references: list[str] = (),
                     confidence: float = 0.95, resamples: int = 9999, seed: int = 0) -> pd.DataFrame:
    """Scores, Avg and Mean of ``runs`` and their differences to each of ``references``, each with a
    percentile bootstrap interval (``scipy.stats.bootstrap``) over the questions.

    One resampling of question (doc) ids per task is shared by every run, so differences are
    paired; tasks are resampled independently (stratified). F1 tasks are rescored on each resample.
    ``Avg`` = mean over tasks of score / ``base``'s score (the paper's normalised average, fraction),
    ``Mean`` = mean task score. Returns long form: run, versus (``""`` for the run's own value, else
    the reference), measure (a task, ``Avg`` or ``Mean``), value, low, high, questions (per task; total for Avg/Mean).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be an int >= 1, got {resamples!r}")
    order = list(dict.fromkeys([base, *runs, *references]))
    data = _Resampler(samples, order)
    if not data.tasks:
        raise ValueError(f"no per-sample rows for runs {order}")
    b, refs = order.index(base), [order.index(r) for r in references]

    def statistic(*indices, axis=-1):
        values = _summaries(data.scores(*indices), b, refs)
        return values.reshape(-1, *values.shape[3:])

    positions = [np.arange(n) for n in data.sizes.values()]
    point = statistic(*positions)
    with warnings.catch_warnings():  # a constant outcome (every resample equal) is a valid zero-width interval
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap(positions, statistic, n_resamples=resamples, confidence_level=confidence, method="percentile",
                           vectorized=True, paired=False, batch=max(1, 200_000 // sum(data.sizes.values())), rng=seed)
    shape = (1 + len(refs), len(data.tasks) + 2, len(order))
    low, high = (np.asarray(v).reshape(shape) for v in result.confidence_interval)
    point = point.reshape(shape)
    measures = [*data.tasks, "Avg", "Mean"]
    total = sum(data.sizes.values())
    records = []
    for v, versus in enumerate(["", *references]):
        for m, measure in enumerate(measures):
            for r, run in enumerate(order):
                if run not in runs or run == versus:
                    continue
                records.append({"run": run, "versus": versus, "measure": measure, "value": point[v, m, r],
                                "low": low[v, m, r], "high": high[v, m, r],
                                "questions": data.sizes.get(measure, total)})
    return pd.DataFrame(records)


def mcnemar(samples: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """McNemar's exact test of runs ``a`` against ``b`` per task on the questions both answered:
    ``a_only`` = a right and b wrong, ``b_only`` the reverse, two-sided p = ``scipy.stats.binomtest``
    (a_only, a_only + b_only, 0.5) (1 when they never disagree). F1 tasks are listed too, but their
    score is no per-question mean: compare them by :func:`paired_bootstrap` instead (``metric`` column)."""
    rows = []
    pair = samples[samples["run"].isin([a, b])]
    for task, group in pair.groupby("task", sort=True):
        wide = group.pivot_table(index="doc_id", columns="run", values="correct", aggfunc="first").dropna()
        if a not in wide or b not in wide:
            raise ValueError(f"task {task!r}: mcnemar needs samples of both {a!r} and {b!r}")
        right_a, right_b = wide[a].astype(bool), wide[b].astype(bool)
        a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
        p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
        rows.append({"task": task, "metric": group["metric"].iloc[0], "questions": len(wide),
                     "a_correct": int(right_a.sum()), "b_correct": int(right_b.sum()),
                     "a_only": a_only, "b_only": b_only, "p": float(p)})
    return pd.DataFrame(rows)


def seed_spread(samples: pd.DataFrame, base: dict[str, float] | None = None) -> pd.DataFrame:
    """Per method and budget with more than one seed: per task, the plain ``Mean`` of the tasks and, given
    the unpruned scores ``base`` ({task: score}), ``Avg`` (mean of score / base): the mean, sample standard
    deviation (ddof 1), min and max over the seeds' runs, and the number of seeds."""
    if samples.empty:
        return pd.DataFrame(columns=["method", "keep", "task", "seeds", "mean", "sd", "min", "max"])
    scores = (samples.groupby(["method", "keep", "seed", "task"]).apply(task_score, include_groups=False)
              .rename("score").reset_index())
    return score_spread(scores, base)


def score_spread(scores: pd.DataFrame, base: dict[str, float] | None = None) -> pd.DataFrame:
    """:func:`seed_spread` from the runs' task scores (columns method, keep, seed, task, score) instead of
    their per-question rows (a benchmark whose per-question outcome is no 0/1 has its score only)."""
    if scores.empty:
        return pd.DataFrame(columns=["method", "keep", "task", "seeds", "mean", "sd", "min", "max"])
    per_seed = scores.groupby(["method", "keep", "seed"])
    extra = [per_seed["score"].mean().reset_index().assign(task="Mean")]
    if base is not None:
        relative = scores.assign(score=scores["score"] / scores["task"].map(base).replace(0, np.nan))
        extra.append(relative.groupby(["method", "keep", "seed"])["score"].mean().reset_index().assign(task="Avg"))
    scores = pd.concat([scores, *extra], ignore_index=True)
    spread = scores.groupby(["method", "keep", "task"])["score"].agg(seeds="count", mean="mean", sd="std", min="min",
                                                                     max="max").reset_index()
    return spread[spread["seeds"] > 1].reset_index(drop=True)


# ---------------------------------------------------------------- formatting for readers

def keep_label(keep) -> str:
    """A budget as the paper prints it: tokens (``192``) or a ratio in percent (``20%``)."""
    if keep is None or (isinstance(keep, float) and math.isnan(keep)):
        return "all"
    return f"{100 * keep:g}%" if isinstance(keep, float) and keep <= 1 else f"{float(keep):.0f}"


def metric_label(metric: str) -> str:
    """Column unit of a task's score: ``accuracy %`` or ``F1 %``."""
    return {"f1": "F1 %", "accuracy": "accuracy %"}.get(metric, f"{metric} %")


def interval(value, low, high, scale: float = 100, digits: int = 1, signed: bool = False, star: bool = False) -> str:
    """``"93.0 [90.1, 95.7]"`` (``scale`` x each number); ``signed`` puts + on positives; ``star`` appends ``*``
    when the interval excludes 0 (a difference significant at the interval's level); ``n/a`` for missing values."""
    sign = "+" if signed else ""
    if pd.isna(value):
        return "n/a"
    if pd.isna(low) or pd.isna(high):  # e.g. Avg when the unpruned score is 0 on some resample
        return f"{scale * value:{sign}.{digits}f} [interval n/a]"
    text = f"{scale * value:{sign}.{digits}f} [{scale * low:{sign}.{digits}f}, {scale * high:{sign}.{digits}f}]"
    return text + ("*" if star and (low > 0 or high < 0) else "")


def markdown_frame(frame: pd.DataFrame) -> str:
    """A markdown table of a frame's cells as they are (strings, ints); no index column; ``testbed_`` dropped
    from headers."""
    header = "| " + " | ".join(str(c).replace("testbed_", "") for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"
