"""Seaborn figures of the pipeline: each function takes measured data and returns a matplotlib Figure.

``note`` (e.g. "RANDOM WEIGHTS ...") is printed in red across the top of the figure, so a figure
from an untrained model says so on its face. :func:`save` writes a PNG.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # notebooks keep their inline backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from zoo_prune.demo import highlight  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")
logging.getLogger("matplotlib.category").setLevel(logging.ERROR)  # token counts as bar categories are intended


def _stamp(fig, title: str, note: str = "") -> plt.Figure:
    """Bold title and the red note on top, both wrapped to the figure's width; the axes below them."""
    width = fig.get_figwidth()
    title = textwrap.fill(title, int(width * 9))
    note = textwrap.fill(note, int(width * 11)) if note else ""
    inch = 1 / fig.get_figheight()  # one inch as a fraction of the figure's height
    fig.suptitle(title, fontsize=12, fontweight="bold", y=1 - 0.05 * inch, va="top")
    top = 1 - (0.12 + 0.22 * (title.count("\n") + 1)) * inch
    if note:
        fig.text(0.5, top, note, ha="center", va="top", color="crimson", fontsize=9, fontweight="bold")
        top -= 0.18 * (note.count("\n") + 1) * inch
    fig.tight_layout(rect=(0, 0, 1, top - 0.05 * inch))
    return fig


def _categorical_tokens(data: pd.DataFrame) -> pd.DataFrame:
    """Token counts as ordered categories, largest first (bar plots' x axis)."""
    order = [str(t) for t in sorted(data["tokens"].unique(), reverse=True)]
    return data.assign(tokens=pd.Categorical(data["tokens"].astype(str), categories=order, ordered=True))


def _legend_right(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)


def save(fig: plt.Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def agreement_heatmap(table: pd.DataFrame, note: str = "", samples: int | None = None) -> plt.Figure:
    """Mean Spearman rho between estimators' per-token sensitivities."""
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    sns.heatmap(table.astype(float), annot=True, fmt=".3f", vmin=-1, vmax=1, cmap="vlag", square=True, ax=ax,
                cbar_kws={"label": "Spearman rho"})
    ax.set(xlabel="", ylabel="")
    return _stamp(fig, f"Estimator agreement (mean over {samples} images)" if samples else "Estimator agreement", note)


def overlay_grid(rows: list[dict], note: str = "") -> plt.Figure:
    """Kept-token masks (Fig. 6 / Fig. B style): one row per image, one column per (method, budget).

    ``rows[i]``: ``{"title": question -> answer, "view": RGB (H, W, 3) in [0, 1],
    "panels": [(column title, kept mask (g, g) bool, predicted answer), ...]}``.
    """
    n_cols = len(rows[0]["panels"]) + 1
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.9 * n_cols, 2.8 * len(rows) + 0.6), squeeze=False)
    for axis_row, row in zip(axes, rows):
        axis_row[0].imshow(row["view"], interpolation="nearest")
        axis_row[0].set_title(textwrap.fill(row["title"], 34, replace_whitespace=False), fontsize=7)
        for axis, (title, mask, answer) in zip(axis_row[1:], row["panels"]):
            axis.imshow(highlight(row["view"], mask), interpolation="nearest")
            axis.set_title(f"{title}\n-> {answer!r}", fontsize=7)
        for axis in axis_row:
            axis.axis("off")
    return _stamp(fig, "Kept visual tokens: DivPrune vs ZOO-Prune (pruned tokens dimmed)", note)


def proxy_kde(rhos: pd.DataFrame, form: str, threshold: float, note: str = "", noise: dict | None = None,
              paper: dict | None = None) -> plt.Figure:
    """KDE of per-sample Spearman rho (paper Fig. 2), one curve per task, mean rho and number of images
    annotated; ``noise`` ({task: mean rho between two draws of a sampled form}) beside it; ``paper``
    ({task: the paper's mean rho}) a dotted line per task and the value beside ours."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    data = rhos.dropna(subset=["rho"])
    sns.kdeplot(data=data, x="rho", hue="task", fill=True, common_norm=False, cut=0, ax=ax, warn_singular=False)
    for i, (task, group) in enumerate(data.groupby("task", sort=False)):
        mean = group["rho"].mean()
        ax.axvline(mean, color=sns.color_palette()[i], ls="--")
        extra = f"; estimator noise: rho between two draws {noise[task]:.2f}" if noise and task in noise else ""
        text = f"{task}: mean rho = {mean:.2f} (n={len(group)} images{extra})"
        if paper and task in paper:
            ax.axvline(paper[task], color=sns.color_palette()[i], ls=":", lw=2)
            text = (f"{task}: mean rho = {mean:.2f} (dashed), the paper's {paper[task]:.2f} (dotted); n={len(group)} images"
                    + (f"\n    {extra[2:]}" if extra else ""))
        ax.annotate(text, xy=(0.02, 0.9 - 0.16 * i if paper else 0.92 - 0.08 * i),
                    xycoords="axes fraction", color=sns.color_palette()[i], fontsize=9)
    ax.set(xlim=(-1, 1), xlabel="Spearman rho, encoder vs projector token sensitivity", ylabel="density")
    return _stamp(fig, f"Projector as a proxy for the encoder: encoder side by the {form} form, tokens with "
                       f"normalised projector sensitivity >= {threshold}", note)


def avg_vs_tokens(table: pd.DataFrame, note: str = "", spread: pd.DataFrame | None = None, questions: str = "") -> plt.Figure:
    """Normalised Avg (% of unpruned) against kept tokens, one line per method; error bars = the table's
    ``Avg low`` / ``Avg high`` interval when present; ``spread`` (``stats.seed_spread``): each seeded
    method's Avg over seeds (mean, min-max) as a shaded band."""
    data = table.reset_index()
    base = data[data["method"] == "unpruned"]
    data = data[data["method"] != "unpruned"]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    palette = dict(zip(data["method"].unique(), sns.color_palette(n_colors=data["method"].nunique())))
    methods = list(palette)
    offsets = {m: (i - (len(methods) - 1) / 2) * 0.35 for i, m in enumerate(methods)}  # keep error bars apart
    for method, group in data.groupby("method", sort=False):
        group = group.sort_values("tokens")
        x = group["tokens"] + offsets[method]
        y = 100 * group["Avg"]
        if "Avg low" in group:
            err = [100 * (group["Avg"] - group["Avg low"]), 100 * (group["Avg high"] - group["Avg"])]
            ax.errorbar(x, y, yerr=err, color=palette[method], marker="o", ms=4, capsize=2, lw=1.3, label=method)
        else:
            ax.plot(x, y, color=palette[method], marker="o", ms=4, label=method)
        if spread is not None and len(spread):
            band = spread[(spread["method"] == method) & (spread["task"] == "Avg")].sort_values("keep")
            if len(band):
                ax.fill_between(band["keep"], 100 * band["min"], 100 * band["max"], color=palette[method], alpha=0.15,
                                lw=0, label=f"{method}: range over {int(band['seeds'].max())} seeds")
    ax.axhline(100, color="k", lw=1, ls=":", label="unpruned")
    ax.set(xlabel=f"visual tokens kept (of {int(base['tokens'].iloc[0]) if len(base) else '?'})",
           ylabel="Avg (% of unpruned)", xticks=sorted(data["tokens"].unique()), ylim=(0, None))
    _legend_right(ax)
    bars = "; bars: 95% paired-bootstrap intervals" if "Avg low" in data else ""
    return _stamp(fig, f"Accuracy retained after pruning (normalised Avg){bars}" + (f" ({questions})" if questions else ""), note)


def differences(comparisons: pd.DataFrame, reference: str, note: str = "", questions: str = "",
                measure: str = "Avg") -> plt.Figure:
    """Every method's paired difference in ``measure`` to ``reference`` at each budget, with its interval
    (``comparisons``: long form of method, keep, versus, measure, value, low, high); 0 marked."""
    data = comparisons[(comparisons["versus"] == reference) & (comparisons["measure"] == measure)].copy()
    data["label"] = data["method"] + " @ " + data["keep"].map(lambda k: f"{float(k):g}")
    data = data.sort_values(["keep", "method"], ascending=[False, True])
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(data) + 2.8))
    y = np.arange(len(data))[::-1]
    significant = (data["low"] > 0) | (data["high"] < 0)
    for yi, (value, low, high), red in zip(y, data[["value", "low", "high"]].to_numpy(), significant):
        ax.errorbar(100 * value, yi, xerr=[[100 * (value - low)], [100 * (high - value)]], fmt="o", ms=4, capsize=2,
                    color="crimson" if red else "grey")
    ax.axvline(0, color="k", lw=1)
    ax.set(yticks=y, yticklabels=data["label"], ylabel="", ylim=(-0.7, len(data) - 0.3),
           xlabel=f"{measure} minus {reference}'s ({'points of % of unpruned' if measure == 'Avg' else 'points'})")
    ax.tick_params(axis="y", labelsize=8)
    return _stamp(fig, f"Paired difference to {reference} with 95% interval (red: excludes 0)"
                       + (f" ({questions})" if questions else ""), note)


def ablation_bars(table: pd.DataFrame, note: str = "", questions: str = "") -> plt.Figure:
    """Table 5 as bars from 0: Avg (% of unpruned) per selection variant and budget; error bars = the
    table's ``Avg low`` / ``Avg high`` interval when present."""
    data = table.reset_index().sort_values("tokens", ascending=False)
    variants = list(dict.fromkeys(data["variant"]))
    budgets = list(dict.fromkeys(data["tokens"]))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (variant, colour) in enumerate(zip(variants, sns.color_palette(n_colors=len(variants)))):
        rows = data[data["variant"] == variant].set_index("tokens").reindex(budgets)
        x = np.arange(len(budgets)) + (i - (len(variants) - 1) / 2) * width
        err = None
        if "Avg low" in rows:
            err = [100 * (rows["Avg"] - rows["Avg low"]), 100 * (rows["Avg high"] - rows["Avg"])]
        bars = ax.bar(x, 100 * rows["Avg"], width, yerr=err, capsize=2, color=colour, label=variant)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, label_type="center", color="white")
    ax.set(xticks=np.arange(len(budgets)), xticklabels=[str(b) for b in budgets], ylim=(0, None),
           xlabel="visual tokens kept", ylabel="Avg (% of unpruned)")
    _legend_right(ax)
    bars = "; bars: 95% paired-bootstrap intervals" if "Avg low" in data else ""
    return _stamp(fig, f"Ablation of the selection score (Table 5){bars}" + (f" ({questions})" if questions else ""), note)


def sweep(data: pd.DataFrame, x: str, metric: str, reference: float | None = None, reference_label: str = "",
          note: str = "", questions: str = "") -> plt.Figure:
    """Score against a hyperparameter (paper Fig. 4), log x, y from 0; optional horizontal reference line."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sns.lineplot(data=data, x=x, y="score", marker="o", ax=ax, label="ZOO-Prune")
    if reference is not None:
        ax.axhline(reference, color="crimson", ls="--", label=reference_label)
    ax.set(xscale="log", xlabel=x, ylabel=metric, ylim=(0, 1.02))
    ax.legend(fontsize=8)
    return _stamp(fig, f"Effect of {x}" + (f" ({questions})" if questions else ""), note)


def speed_bars(data: pd.DataFrame, value: str, label: str, note: str = "") -> plt.Figure:
    """Fig. 5 style: ``value`` per method at each budget, speed-up over unpruned annotated in each bar."""
    base = data.loc[data["method"] == "unpruned", value].median()
    pruned = _categorical_tokens(data[data["method"] != "unpruned"])
    fig, ax = plt.subplots(figsize=(9, 4))
    sns.barplot(data=pruned, x="tokens", y=value, hue="method", ax=ax, errorbar=None)
    for container in ax.containers:
        ax.bar_label(container, labels=[f"{base / b.get_height():.2f}x" if b.get_height() else "" for b in container],
                     fontsize=6, rotation=90, label_type="center")
    ax.axhline(base, color="k", ls=":", label=f"unpruned ({base:.3g})")
    ax.set(xlabel="visual tokens kept", ylabel=value.replace("_", " "))
    _legend_right(ax)
    return _stamp(fig, f"{label}: speed-up over unpruned in each bar", note)


def measured_and_counted(data: pd.DataFrame, measured: str, counted: str, measured_label: str, counted_label: str,
                         note: str = "") -> plt.Figure:
    """Measured time (left) and counted FLOPs (right) per method and budget, side by side; each bar
    carries its ratio to unpruned (speed-up on the left, FLOP ratio on the right)."""
    pruned = _categorical_tokens(data[data["method"] != "unpruned"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, value, label in ((axes[0], measured, measured_label), (axes[1], counted, counted_label)):
        base = data.loc[data["method"] == "unpruned", value].median()
        sns.barplot(data=pruned, x="tokens", y=value, hue="method", ax=ax, errorbar=None, legend=ax is axes[1])
        for container in ax.containers:
            ax.bar_label(container, labels=[f"{base / b.get_height():.2f}x" if b.get_height() else "" for b in container],
                         fontsize=6, rotation=90, label_type="center")
        ax.axhline(base, color="k", ls=":")
        ax.set(xlabel="visual tokens kept", ylabel=value.replace("_", " "))
        ax.set_title(f"{label}; unpruned {base:.3g} (dotted)", fontsize=9)
    _legend_right(axes[1])
    return _stamp(fig, "Measured (left) and counted (right), ratio to unpruned in each bar", note)


def flops_bars(data: pd.DataFrame, model: str, note: str = "") -> plt.Figure:
    """Fig. A style: TFLOPs by method and budget (the ledger: counted on the real graph); with a
    ``paper_app_d`` column, the paper's value as a black diamond on the bar where it gives one."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    data = _categorical_tokens(data)
    methods = list(dict.fromkeys(data["method"]))
    sns.barplot(data=data, x="tokens", y="tflops", hue="method", hue_order=methods, ax=ax)
    for container in ax.containers:
        ax.bar_label(container, fmt="%.2f", fontsize=7)
    paper = data.set_index(["method", "tokens"])["paper_app_d"].dropna().to_dict() if "paper_app_d" in data else {}
    points = []
    for method, container in zip(methods, ax.containers):
        for bar in container:  # a bar's category: the x tick its centre is nearest to
            centre = bar.get_x() + bar.get_width() / 2
            value = paper.get((method, data["tokens"].cat.categories[int(round(centre))]))
            if value is not None:
                points.append((centre, value))
    if points:
        ax.scatter(*zip(*points), marker="D", s=22, color="black", zorder=3, label="paper App. D")
    ax.set(xlabel="visual tokens kept", ylabel="TFLOPs (2 per multiply-add)")
    _legend_right(ax)
    return _stamp(fig, f"Prefill FLOPs of {model}, counted on its graph (not measured)", note)


def layer_times(data: pd.DataFrame, note: str = "") -> plt.Figure:
    """Seconds of one decoder layer of 7B width against sequence length (CPU)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sns.lineplot(data=data, x="tokens", y="seconds", marker="o", ax=ax)
    for _, row in data.iterrows():
        ax.annotate(f"{row['seconds']:.2f}s", (row["tokens"], row["seconds"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set(xlabel="sequence length (tokens)", ylabel="seconds per forward")
    return _stamp(fig, "One 7B-width decoder layer, CPU fp32, random weights", note)


def paper_avg(panels: dict[str, pd.DataFrame], note: str = "", questions: str = "") -> plt.Figure:
    """Avg (% of unpruned) against the budget, measured (solid, circles) beside the paper's published value
    (dashed, crosses), one colour per method, one panel per table: ``panels`` {title: the ``avg`` cells of
    ``analysis.paper.compare`` (method, keep, measured, paper)}. Budgets are categories, largest first
    (token counts and ratios alike); the unpruned model's 100% dotted."""
    from analysis.stats import UNPRUNED, keep_label

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 1.8, 4.2), squeeze=False)
    methods = list(dict.fromkeys(m for cells in panels.values() for m in cells["method"] if m != UNPRUNED))
    palette = dict(zip(methods, sns.color_palette(n_colors=max(len(methods), 1))))
    for ax, (title, cells) in zip(axes[0], panels.items()):
        data = cells[cells["method"] != UNPRUNED]
        budgets = sorted(dict.fromkeys(data["keep"]), key=float, reverse=True)
        x = {k: i for i, k in enumerate(budgets)}
        for method, group in data.groupby("method", sort=False):
            group = group.assign(x=group["keep"].map(x)).sort_values("x")
            ax.plot(group["x"], group["measured"], color=palette[method], marker="o", ms=5, lw=1.5, label=f"{method}")
            if group["paper"].notna().any():
                ax.plot(group["x"], group["paper"], color=palette[method], marker="x", ms=6, lw=1, ls="--",
                        label=f"{method} (paper)")
        ax.axhline(100, color="k", lw=1, ls=":")
        ax.set(xticks=range(len(budgets)), xticklabels=[keep_label(k) for k in budgets], xlim=(-0.5, len(budgets) - 0.5),
               xlabel="visual tokens kept", ylabel="Avg (% of unpruned)", title=title)
        if data["measured"].isna().all():
            ax.text(0.5, 0.5, "measured Avg undefined\n(a benchmark is missing, or the\nunpruned model scores 0 on one)",
                    transform=ax.transAxes, ha="center", va="center", fontsize=9, color="dimgray")
        values = pd.concat([data["measured"], data["paper"]]).dropna()
        ax.set_ylim(min(0, values.min() - 5) if len(values) else 0, max(105, values.max() + 5) if len(values) else 105)
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1),
                       frameon=False)
    return _stamp(fig, "Accuracy retained: measured (solid) and the paper's (dashed)"
                       + (f" ({questions})" if questions else ""), note)


def stamp(source, target, note: str) -> Path:
    """A copy of the PNG ``source`` at ``target`` with ``note`` in red bold on a band above it (the pixels of
    the original unchanged), so a figure copied from a rehearsal says so on its face."""
    image = plt.imread(str(source))
    height, width = image.shape[:2]
    dpi = 100
    text = textwrap.fill(note, max(20, int(width / 9.5)))  # ~9 px per bold 10 pt character at 100 dpi
    band = int(17 * (text.count("\n") + 1) + 14)
    fig = plt.figure(figsize=(width / dpi, (height + band) / dpi), dpi=dpi)
    fig.figimage(image, xo=0, yo=0, origin="upper")
    fig.text(0.5, 1 - 6 / (height + band), text, ha="center", va="top", color="crimson", fontsize=10, fontweight="bold")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=dpi)
    plt.close(fig)
    return target
