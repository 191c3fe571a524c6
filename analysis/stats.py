"""Statistics of the pipeline's measured outputs: plain functions, data in, numbers or tables out."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

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


def proxy_rho(projector, encoder, threshold: float = 0.5) -> tuple[float, int]:
    """(rho, tokens kept): Spearman of projector vs encoder sensitivities over the tokens whose
    min-max normalised projector sensitivity is >= ``threshold`` (method.md section 5)."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    projector, encoder = minmax(projector), minmax(encoder)
    keep = projector >= threshold
    return spearman(projector[keep], encoder[keep]), int(keep.sum())


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


def task_scores(results: dict) -> dict[str, float]:
    """``{task: primary score}`` of an lmms-eval results JSON (groups, which carry no score, are skipped)."""
    scores = {}
    for task, entry in results["results"].items():
        metrics = {k.split(",")[0]: v for k, v in entry.items() if "," in k and "stderr" not in k
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        rule = next((r for r in PRIMARY if all(m in metrics for m in ((r,) if isinstance(r, str) else r))), None)
        if rule is not None:
            scores[task] = float(sum(metrics[m] for m in ((rule,) if isinstance(rule, str) else rule)))
        elif metrics:
            scores[task] = float(next(iter(metrics.values())))
    if not scores:
        raise ValueError(f"no task scores in results (tasks: {list(results['results'])})")
    return scores


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


def read_runs(folder, expected: list[tuple[str, int | None]] | None = None) -> pd.DataFrame:
    """Long-form (method, keep, task, score) of the evaluate runs under ``folder``
    (``<method>-<keep>/scores.json`` and ``unpruned/scores.json``); names any ``expected`` run that is missing."""
    from pathlib import Path
    import json

    folder = Path(folder)
    records, found = [], set()
    for path in sorted(folder.glob("*/scores.json")):
        name = path.parent.name
        method, keep = (UNPRUNED, None) if name == UNPRUNED else (name.rsplit("-", 1)[0], int(name.rsplit("-", 1)[1]))
        found.add((method, keep))
        records += [{"method": method, "keep": keep, "task": t, "score": s} for t, s in json.loads(path.read_text()).items()]
    missing = [f"{m}-{k}" if k is not None else m for m, k in (expected or []) if (m, k) not in found]
    if missing:
        raise FileNotFoundError(f"evaluate runs missing under {folder}: {missing} (run dvc repro evaluate)")
    runs = pd.DataFrame(records, columns=["method", "keep", "task", "score"])
    if expected is not None:
        runs = runs[[(m, None if pd.isna(k) else int(k)) in set(expected) for m, k in zip(runs["method"], runs["keep"])]]
    return runs
