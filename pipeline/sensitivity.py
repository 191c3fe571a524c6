"""Stage ``sensitivity``: every estimator's per-token sensitivities on a sample set, their agreement
(Spearman table), and DivPrune vs ZOO-Prune kept-token overlays at every budget (paper Fig. 6 / B).

Testbed (dvc.yaml): the testbed model on ``sensitivity.samples`` questions of ``sensitivity.task``.
Outputs: ``--out`` (sensitivities.npz: estimator -> (samples, N); agreement.csv; timing.csv),
``--metrics`` (JSON), ``--figures`` (agreement.png, overlays.png).

Paper profile (paper/dvc.yaml, one entry per model of ``paper.models``)::

    python -m pipeline.sensitivity --params paper/params.yaml --paper-model llava-next-7b \\
        --out paper/outputs/sensitivity/llava-next-7b

The model in ``paper.dtype`` on ``paper.device``, ``paper.sensitivity.samples`` documents of lmms-eval task
``paper.sensitivity.task`` (its own YAML; the first image of each, documents without an image skipped and
counted), prompted with the task's own text. X is what the model feeds its projector, per image, from its
adapter: LLaVA-NeXT's every patch (base, then the crop grid in the model's packed order); Qwen2.5-VL's merger
input per merged token, perturbed through ``GroupedProjector``. Each estimator of ``sensitivity.estimators``
that applies to the projector (``fused``, ``lowrank`` and ``closed_form`` need a Linear-act-Linear one, which
Qwen2.5-VL's merger is not: named in estimators.csv) computes in float32 whatever the model's dtype, timed
with CUDA synchronised, its per-model state (upcast weights, SVD, Gram matrix) built before the timings.
Overlays: the first ``paper.sensitivity.overlay_samples`` images, DivPrune vs ZOO-Prune (with the model's
paper estimator, ``paper.models.<m>.estimator``: LLaVA-NeXT's lowrank) at each of the model's budgets, kept
tokens by ``zoo_prune.apply_pruning`` (``handle.kept_indices``); LLaVA-NeXT draws its base patch and its crop
mosaic as two rows. Everything inside ``--out``: sensitivities.npz (estimator -> the images' values
concatenated; ``tokens``: each image's count; ``doc_id``), agreement.csv, estimators.csv, overlays.csv (kept
tokens drawn per image, view, method and budget), metrics.json, figures/agreement.png, figures/overlays.png.
A random-weight stand-in's tables carry a ``note`` column and its figures the note on their face
(``_paper.weights_note``). An absent checkpoint writes ``skipped.json`` instead (``pipeline._paper``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import figures, stats

from . import _paper
from ._common import StageError, load_model, load_rows, parser, profile_of, stage, weights_note, write_json

OVERLAY_METHODS = ("divprune", "zoo")  # Fig. 6: DivPrune vs ZOO-Prune


@torch.no_grad()
def projector_io(model, processor, image, question: str) -> tuple[dict, torch.Tensor]:
    """(processor inputs, X): what the model feeds its projector for one image (one forward of its vision side)."""
    from zoo_prune import adapter_for
    from zoo_prune.tiny import chat_prompt

    inputs = processor(images=image, text=chat_prompt(processor, question), return_tensors="pt")
    features, _ = adapter_for(model).features(inputs)
    return inputs, features[0].float()


@torch.no_grad()
def kept_and_answer(model, processor, inputs, method: str, keep, options: dict) -> tuple[torch.Tensor, str]:
    """Indices kept by ``method`` at ``keep`` and the model's answer with them (``apply_pruning``)."""
    from zoo_prune import apply_pruning
    from zoo_prune.testbed.evaluate import normalise

    with apply_pruning(model, method, keep=keep, **options) as handle:
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        kept = handle.kept_indices[0]
    return kept, normalise(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def score_estimators(projector, x: torch.Tensor, estimators: list[str], zoo: dict, rank: int,
                     device=None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Each estimator's (N,) sensitivities of one image's X and the seconds it took (CUDA synchronised
    on a GPU ``device``); zoo's m, h and seed."""
    from zoo_prune import zo_sensitivity
    from zoo_prune.timing import time_call

    scores, seconds = {}, {}
    for name in estimators:
        result = []
        timing = time_call(lambda: result.append(zo_sensitivity(projector, x, m=zoo["m"], h=zoo["h"], seed=zoo["seed"],
                                                                  estimator=name, rank=rank)),
                           repeats=1, warmup=0, device=device)
        scores[name], seconds[name] = result[0].cpu().numpy(), timing.median
    return scores, seconds


def overlay_rows(model, processor, image, inputs, title: str, budgets, options: dict) -> tuple[list[dict], list[dict]]:
    """DivPrune vs ZOO-Prune on one image at every budget: ``figures.overlay_grid`` rows (one per view of
    the image the model saw: LLaVA-NeXT's base patch and crop mosaic) and per view, method and budget the
    kept tokens drawn (``view``, ``method``, ``keep``, ``kept``, ``cells``, ``answer``)."""
    from zoo_prune.demo import token_views

    panels, counts, views = {}, [], []
    for keep in budgets:
        for method in OVERLAY_METHODS:
            kept, answer = kept_and_answer(model, processor, inputs, method, keep, options[method])
            views = token_views(model, processor, image, inputs, kept)
            for name, _, mask in views:
                panels.setdefault(name, []).append((f"{method} {keep}", mask, answer))
                counts.append({"view": name, "method": method, "keep": keep, "answer": answer,
                               "kept": None if mask is None else int(mask.sum()),
                               "cells": None if mask is None else int(mask.size)})
    rows = [{"title": title if len(views) == 1 else f"{name}\n{title}", "view": view, "panels": panels[name]}
            for name, view, _ in views]
    return rows, counts


def not_applicable(projector, estimator: str) -> str | None:
    """Why ``estimator`` cannot run on ``projector`` (the library's own message), or None when it can:
    ``naive`` runs on any projector, the others need a Linear-act-Linear one."""
    from zoo_prune.projector import mlp_parts

    if estimator == "naive":
        return None
    parameter = next(projector.parameters())
    try:
        mlp_parts(projector, estimator, torch.float32, parameter.device)
    except TypeError as error:
        return str(error)
    return None


def main(argv=None) -> None:
    p = parser(__doc__, "sensitivity")
    p.add_argument("--paper-model", help="paper profile: the model of params paper.models this entry measures")
    p.set_defaults(out=None, metrics=None, figures=None)  # the testbed's defaults, or inside --out (paper)
    args = p.parse_args(argv)
    if profile_of(args.params) == "paper":
        if not args.paper_model:
            p.error("the paper profile needs --paper-model (a model of params paper.models; paper/dvc.yaml passes it)")
        if not args.out:
            from .schema import read

            args.out = f"{read(args.params)['paper']['dir']}/outputs/sensitivity/{args.paper_model}"
        with stage(f"sensitivity/{args.paper_model}", args, ["zoo", "sensitivity", "paper"], ["out"]) as s:
            paper_profile(s, args.paper_model)
        return
    args.out = args.out or "outputs/sensitivity"
    args.metrics = args.metrics or "outputs/metrics/sensitivity.json"
    args.figures = args.figures or "outputs/figures/sensitivity"
    with stage("sensitivity", args, ["zoo", "budgets", "sensitivity"], ["out", "metrics", "figures"]) as s:
        testbed_profile(s, args)


def testbed_profile(s, args) -> None:
    from zoo_prune import adapter_for

    cfg, zoo, budgets = s.params["sensitivity"], s.params["zoo"], s.params["budgets"]
    estimators, reference = cfg["estimators"], cfg["reference"]
    model, processor = load_model(args.model)
    rows = load_rows(args.data, cfg["task"], cfg["samples"])
    projector = adapter_for(model).projector
    scores = {name: [] for name in estimators}
    seconds = {name: 0.0 for name in estimators}
    samples = []
    for row in tqdm(rows, desc="sensitivity: estimators", unit="img"):
        inputs, x = projector_io(model, processor, row["image"], row["question"])
        samples.append((row, inputs))
        values, times = score_estimators(projector, x, estimators, zoo, cfg["rank"])
        for name in estimators:
            scores[name].append(values[name])
            seconds[name] += times[name]
    table = stats.agreement(scores)
    timing = pd.DataFrame({"estimator": estimators, "ms_per_image": [1000 * seconds[n] / len(rows) for n in estimators]})

    note = weights_note(args.model)
    panels = []
    options = {"zoo": {k: zoo[k] for k in ("m", "h", "estimator", "seed")}, "divprune": {}}
    for row, inputs in tqdm(samples[:cfg["overlay_samples"]], desc="sensitivity: overlays", unit="img"):
        panels += overlay_rows(model, processor, row["image"], inputs, f"{row['question']} -> {row['answer']}", budgets,
                               options)[0]

    out, fig_dir = s.out["out"], s.out["figures"]
    out.mkdir(parents=True)
    np.savez_compressed(out / "sensitivities.npz", **{n: np.stack(v) for n, v in scores.items()})
    table.to_csv(out / "agreement.csv")
    timing.to_csv(out / "timing.csv", index=False)
    images = {"agreement": figures.save(figures.agreement_heatmap(table, note, len(rows)), fig_dir / "agreement.png"),
              "overlays": figures.save(figures.overlay_grid(panels, note), fig_dir / "overlays.png")}
    metrics = {"samples": len(rows), "tokens": int(scores[reference][0].size),
               **{f"rho_vs_{reference}/{n}": float(table.loc[n, reference]) for n in estimators if n != reference},
               **{f"ms_per_image/{n}": float(t) for n, t in zip(timing["estimator"], timing["ms_per_image"])}}
    write_json(s.out["metrics"], metrics)
    s.log(metrics=metrics, tables={"agreement": table.reset_index(names="estimator"), "timing": timing},
          images={k: v for k, v in images.items()})


def paper_profile(s, name: str) -> None:
    """One model of ``paper.models`` (module docstring); ``skipped.json`` when its checkpoint is absent."""
    from zoo_prune import adapter_for, precompute
    from zoo_prune.tiny import chat_prompt

    out = s.out["out"]
    _paper.spec(s.params, name)
    record = _paper.availability(s.params, name)
    if not record["available"]:
        return _paper.skip(out, record, f"sensitivity/{name}")
    paper, cfg, zoo = s.params["paper"], s.params["sensitivity"], s.params["zoo"]
    task, reference = paper["sensitivity"]["task"], cfg["reference"]
    rank = paper["sensitivity"].get("rank") or cfg["rank"]  # lowrank's k_r: the paper's 128 (paper/params.yaml)
    model, processor = _paper.load(s.params, name, record)
    adapter = adapter_for(model)
    projector = adapter.sensitivity_projector  # LLaVA's projector; Qwen2.5-VL's merger per merged token
    why_not = {n: not_applicable(projector, n) for n in cfg["estimators"]}
    if why_not[reference]:
        raise StageError(f"params sensitivity.reference = {reference!r} cannot run on {name}'s projector: "
                         f"{why_not[reference]}")
    estimators = [n for n in cfg["estimators"] if why_not[n] is None]
    for n in estimators:  # the one-off per-model state (float32 weights, SVD, Gram matrix): not in the timings
        precompute(projector, n, rank=rank)

    docs = _paper.task_documents(s.params, task, paper["sensitivity"]["samples"])
    scores = {n: [] for n in estimators}
    seconds = {n: 0.0 for n in estimators}
    measured, text_only = [], 0
    for doc in tqdm(docs, desc=f"sensitivity {name}: estimators", unit="img"):
        if not doc["images"]:
            text_only += 1
            continue
        image = doc["images"][0].convert("RGB")
        inputs = processor(images=image, text=chat_prompt(processor, doc["text"]), return_tensors="pt")
        inputs = inputs.to(paper["device"], model.dtype)
        with torch.no_grad():
            [x], _ = adapter.features(inputs)
        values, times = score_estimators(projector, x.float(), estimators, zoo, rank, paper["device"])
        for n in estimators:
            scores[n].append(values[n])
            seconds[n] += times[n]
        measured.append((doc, image, inputs))
    if not measured:
        raise StageError(f"none of the {len(docs)} documents of task {task!r} has an image")
    table = stats.agreement(scores)

    note = _paper.weights_note(record)
    zoo_options = {k: zoo[k] for k in ("m", "h", "estimator", "seed")} | (
        {"estimator": record["estimator"]} if record.get("estimator") else {})  # the paper's LLaVA-NeXT: lowrank
    options = {"zoo": zoo_options, "divprune": {}}
    panels, overlays = [], []
    drawn = measured[:paper["sensitivity"]["overlay_samples"]]
    for doc, image, inputs in tqdm(drawn, desc=f"sensitivity {name}: overlays", unit="img"):
        target = doc["doc"].get("answer", "") if isinstance(doc["doc"], dict) else ""
        title = f"doc {doc['doc_id']}: {doc['text'].splitlines()[0][:40]}" + (f" -> {target}" if target else "")
        rows, counts = overlay_rows(model, processor, image, inputs, title, record["budgets"], options)
        panels += rows
        overlays += [{"doc_id": doc["doc_id"], **c} for c in counts]

    images_n, tokens = len(measured), [len(v) for v in scores[reference]]
    by_estimator = pd.DataFrame({
        "estimator": cfg["estimators"], "runs": [why_not[n] is None for n in cfg["estimators"]],
        "rank": pd.array([rank if n == "lowrank" else None for n in cfg["estimators"]], dtype="Int64"),
        "ms_per_image": [1000 * seconds[n] / images_n if n in seconds else None for n in cfg["estimators"]],
        f"rho_vs_{reference}": [float(table.loc[n, reference]) if n in scores else None for n in cfg["estimators"]],
        "not_applicable": [why_not[n] or "" for n in cfg["estimators"]]})
    out.mkdir(parents=True)
    np.savez_compressed(out / "sensitivities.npz", doc_id=np.array([d["doc_id"] for d, _, _ in measured]),
                        tokens=np.array(tokens),
                        **{n: np.concatenate(v) for n, v in scores.items()})
    _paper.noted(table.rename_axis("estimator"), note).to_csv(out / "agreement.csv")
    _paper.noted(by_estimator, note).to_csv(out / "estimators.csv", index=False)
    overlays = pd.DataFrame(overlays, columns=["doc_id", "view", "method", "keep", "kept", "cells", "answer"])
    _paper.noted(overlays, note).to_csv(out / "overlays.csv", index=False)
    heatmap = figures.agreement_heatmap(table, note, images_n)
    images = {"agreement": figures.save(heatmap, out / "figures" / "agreement.png")}
    if panels:
        images["overlays"] = figures.save(figures.overlay_grid(panels, note), out / "figures" / "overlays.png")
    metrics = {"model": name, "pretrained": record["pretrained"], "revision": record["revision"], "task": task,
               "samples": images_n, "text_only_skipped": text_only, "tokens_per_image": tokens,
               "reference": reference, "estimators": estimators, "rank": rank, "budgets": record["budgets"],
               "paper_estimator": record.get("estimator"), "overlay_zoo_estimator": zoo_options["estimator"],
               **{f"rho_vs_{reference}/{n}": float(table.loc[n, reference]) for n in estimators if n != reference},
               **{f"ms_per_image/{n}": 1000 * seconds[n] / images_n for n in estimators},
               **({"note": note} if note else {})}
    write_json(out / "metrics.json", metrics)
    tables = {"agreement": table.reset_index(names="estimator"), "estimators": by_estimator, "overlays": overlays}
    s.log(metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
          tables={k: _paper.noted(v, note) for k, v in tables.items()}, images=images)


if __name__ == "__main__":
    main()
