"""Stage ``proxy``: is the projector a proxy for the whole vision side? (method.md section 5, paper Fig. 2)

Per sample: the projector sensitivity of each visual token (ZOO-Prune's own, ``zoo`` params) and its
end-to-end sensitivity through the vision encoder: the token's row of the encoder's input sequence
(patch + position embedding) perturbed, encoder and projector run, the change measured over all
output tokens. ``proxy.form``: ``finite_difference`` (||Z(+) - Z(-)||_F / 2h averaged over ``zoo.m``
unit directions: 2 N m encoder passes) or ``backward`` (the root of the unbiased estimate
E_w ||d(w.Z)/dx_i||^2 = ||J_i||_F^2 from ``proxy.directions`` vector-Jacobian products, all tokens
at once; rank-equivalent to the h -> 0 limit) or ``exact`` (||J_i||_F from forward-mode JVPs along every
basis direction of each token kept by the threshold: no estimator noise, about 100 x 96 JVPs per image,
minutes on a CPU). Tokens whose min-max normalised projector sensitivity is below ``proxy.threshold``
dropped; Spearman's rho over the rest. A sampled form also reports its noise: rho between two
independent draws (seeds ``zoo.seed`` and ``zoo.seed + 1``) per image, and on the first
``proxy.exact_samples`` images per task the exact form beside it.

Testbed (dvc.yaml): the testbed model, ``proxy.samples`` questions of each of ``proxy.tasks``; ``--out``
(rhos.csv, summary.csv), ``--metrics`` (JSON), ``--figures`` (proxy_kde.png).

Paper profile (paper/dvc.yaml)::

    python -m pipeline.proxy --params paper/params.yaml --out paper/outputs/proxy

Model ``paper.proxy.model`` (LLaVA-1.5-7B; :func:`vision_side` walks LLaVA-1.5's CLIP tower, so any other
architecture is refused by name) on ``paper.device``, its vision tower and projector in float32 whatever
``paper.dtype`` (the language model is not used); ``paper.proxy.samples`` documents of each of
``paper.proxy.tasks`` (MMMU, POPE) through lmms-eval's own task YAMLs, the first image of each (MMMU's
text-only documents skipped and counted); ``proxy.threshold``, ``proxy.form``, ``proxy.directions`` and
``zoo`` as above (``proxy.exact_samples`` is the testbed's: no exact form beside the sampled one here).
The paper's mean rho per task (analysis/paper_numbers.csv, Fig. 2) beside ours in the figure, the summary
and the metrics. Everything inside ``--out``: rhos.csv, summary.csv, metrics.json, figures/proxy_kde.png;
a random-weight stand-in's tables carry a ``note`` column and its figure the note on its face. An absent
checkpoint writes ``skipped.json`` instead (``pipeline._paper``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import figures, stats

from . import _paper
from ._common import StageError, load_model, load_rows, parser, profile_of, stage, weights_note, write_json

LLAVA = "LlavaForConditionalGeneration"  # the one family whose vision side vision_side() walks


def vision_side(model, embeds: torch.Tensor) -> torch.Tensor:
    """Z = projector(encoder(embeds)) for (B, 1 + N, D) encoder input rows (CLS first), as LLaVA computes it."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    layers = tower.encoder.layers
    layer = model.config.vision_feature_layer
    depth = len(layers) + 1 + layer if layer < 0 else layer  # hidden_states[k] = output of k layers
    hidden = tower.pre_layrnorm(embeds)
    for block in layers[:depth]:
        hidden = block(hidden, None)
    from zoo_prune import adapter_for

    return adapter_for(model).projector(hidden[:, 1:])


def encoder_backward(model, embeds: torch.Tensor, q: int, seed: int) -> torch.Tensor:
    """(N,) root of the q-sample estimate of ||J_i||_F^2, J_i = dZ / d(row i of the encoder input)."""
    x = embeds.detach().clone().requires_grad_(True)
    z = vision_side(model, x)
    generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same draws on every device
    total = torch.zeros(x.shape[1] - 1, dtype=x.dtype, device=x.device)
    for j in range(q):
        w = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
        (grad,) = torch.autograd.grad((z * w).sum(), x, retain_graph=j < q - 1)
        total += grad[0, 1:].pow(2).sum(-1)
    return (total / q).sqrt()


def encoder_exact(model, embeds: torch.Tensor, tokens=None, chunk: int = 64) -> torch.Tensor:
    """(N,) exact ||J_i||_F, J_i = dZ / d(row i of the encoder input), by forward-mode JVPs along every basis
    direction of the rows ``tokens`` (default all N; the others are NaN): ``len(tokens) * width`` JVPs,
    ``chunk`` at a time as one batched forward (attention in SDPA's math kernel, which has forward AD)."""
    from torch.func import jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, width = embeds.shape[1] - 1, embeds.shape[2]
    tokens = torch.arange(n) if tokens is None else torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= n):
        raise ValueError(f"tokens must be in [0, {n}), got {tokens.tolist()}")
    jobs = [(int(i), k) for i in tokens for k in range(width)]
    squared = torch.zeros(n, dtype=embeds.dtype, device=embeds.device)
    base = embeds.detach()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        for start in range(0, len(jobs), chunk):
            part = jobs[start:start + chunk]
            tangent = torch.zeros(len(part), *base.shape[1:], dtype=base.dtype, device=base.device)
            rows = torch.tensor([i for i, _ in part], device=base.device)
            columns = torch.tensor([k for _, k in part], device=base.device)
            tangent[torch.arange(len(part), device=base.device), 1 + rows, columns] = 1
            _, dz = jvp(lambda x: vision_side(model, x), (base.expand(len(part), -1, -1).clone(),), (tangent,))
            squared.index_add_(0, rows, dz.pow(2).flatten(1).sum(1).to(squared.dtype))
    result = torch.full((n,), float("nan"), dtype=embeds.dtype, device=embeds.device)
    result[tokens] = squared[tokens].sqrt()
    return result


@torch.no_grad()
def encoder_finite_difference(model, embeds: torch.Tensor, m: int, h: float, seed: int, chunk: int = 64) -> torch.Tensor:
    """(N,) mean over m unit directions of ||Z(x_i + h u) - Z(x_i - h u)||_F / 2h, over all output tokens."""
    from zoo_prune import draw_directions

    n, width = embeds.shape[1] - 1, embeds.shape[2]
    u = draw_directions(m, width, seed=seed).to(embeds.device, embeds.dtype)
    jobs = [(i, j, s) for i in range(n) for j in range(m) for s in (1, -1)]
    outputs = []
    for start in range(0, len(jobs), chunk):
        batch = embeds.repeat(len(jobs[start:start + chunk]), 1, 1)
        for b, (i, j, s) in enumerate(jobs[start:start + chunk]):
            batch[b, 1 + i] += s * h * u[j]
        outputs.append(vision_side(model, batch))
    z = torch.cat(outputs).view(n, m, 2, -1)
    return ((z[:, :, 0] - z[:, :, 1]).norm(dim=-1) / (2 * h)).mean(1)


FORMS = ("exact", "backward", "finite_difference")


def measure(form: str, model, embeds, kept, params: dict, seed: int) -> np.ndarray:
    """(N,) encoder-side sensitivity of every token by ``form`` (``exact``: the ``kept`` tokens only, others NaN)."""
    zoo, cfg = params["zoo"], params["proxy"]
    if form == "exact":
        return encoder_exact(model, embeds, np.flatnonzero(kept)).cpu().numpy()
    if form == "backward":
        return encoder_backward(model, embeds, cfg["directions"], seed).cpu().numpy()
    return encoder_finite_difference(model, embeds, zoo["m"], zoo["h"], seed).cpu().numpy()


def summary(rhos: pd.DataFrame, form: str) -> pd.DataFrame:
    """Per task: images, mean and sd of rho; for a sampled form its noise (mean rho between two independent
    draws) and, on the images also measured exactly, the mean rho exact beside the sampled one."""
    rows = []
    for task, g in rhos.groupby("task", sort=False):
        row = {"task": task, "images": int(g["rho"].notna().sum()), f"mean rho ({form})": g["rho"].mean(),
               "sd of rho": g["rho"].std()}
        if "draws_rho" in g:
            row["noise: mean rho between two draws"] = g["draws_rho"].mean()
            row["mean rho, second draw"] = g["rho_second_draw"].mean()
        if "rho_exact" in g and g["rho_exact"].notna().any():
            same = g[g["rho_exact"].notna()]
            row |= {"images measured exactly": len(same), "mean rho exact": same["rho_exact"].mean(),
                    f"mean rho ({form}) on those": same["rho"].mean(),
                    f"mean rho {form} vs exact": same["sampled_vs_exact"].mean()}
        rows.append(row)
    return pd.DataFrame(rows)


def measure_image(model, pixels: torch.Tensor, method, params: dict, exact: bool = False) -> dict:
    """One image (``pixels``: the image processor's output on the model's device): ``rho``, ``tokens_kept``
    and, for a sampled form, its second draw (``rho_second_draw``, ``draws_rho``) and with ``exact`` the
    exact form beside it (``rho_exact``, ``sampled_vs_exact``)."""
    from zoo_prune import adapter_for
    from zoo_prune.adapters import record_io

    cfg, seed = params["proxy"], params["zoo"]["seed"]
    form, threshold = cfg["form"], cfg["threshold"]
    embeddings = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).embeddings
    projector = adapter_for(model).projector
    with torch.no_grad(), record_io(projector) as io:
        embeds = embeddings(pixels)
        model.model.get_image_features(pixel_values=pixels)
        if not torch.allclose(vision_side(model, embeds), io["output"], atol=1e-4):
            raise StageError("proxy.vision_side does not reproduce the model's image features "
                             f"({type(model.model.vision_tower).__name__}); it cannot measure this model")
    projector_s = method.sensitivity(io["input"][0].float(), projector).cpu().numpy()
    kept = stats.proxy_mask(projector_s, threshold)
    encoder_s = measure(form, model, embeds, kept, params, seed)
    rho, n_kept = stats.proxy_rho(projector_s, encoder_s, threshold)
    record = {"rho": rho, "tokens_kept": n_kept}
    if form != "exact":  # the sampled form's own noise: a second, independent draw
        second = measure(form, model, embeds, kept, params, seed + 1)
        record |= {"rho_second_draw": stats.proxy_rho(projector_s, second, threshold)[0],
                   "draws_rho": stats.spearman(encoder_s[kept], second[kept])}
        if exact:
            exact_s = measure("exact", model, embeds, kept, params, seed)
            record |= {"rho_exact": stats.proxy_rho(projector_s, exact_s, threshold)[0],
                       "sampled_vs_exact": stats.spearman(encoder_s[kept], exact_s[kept])}
    return record


def zoo_method(zoo: dict, estimator: str | None = None):
    """ZOO-Prune with the params' options (``estimator``: a paper model's own, e.g. LLaVA-NeXT's lowrank)."""
    from zoo_prune import get_method

    options = {k: zoo[k] for k in ("m", "h", "estimator", "seed")}
    return get_method("zoo", **options | ({"estimator": estimator} if estimator else {}))


def frozen(model):
    """``model`` with no parameter asking for gradients (the encoder forms differentiate the input only)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def outputs(rhos: pd.DataFrame, form: str, threshold: float, note: str, out, metrics_path, figure_path,
            paper: dict | None = None, extra: dict | None = None, text_only: dict | None = None):
    """Write rhos.csv and summary.csv into ``out``, the metrics JSON and the KDE figure (the paper's mean rho
    per task beside ours when ``paper`` gives it); returns (metrics, tables, images) for W&B."""
    table = summary(rhos, form)
    noise = dict(zip(table["task"], table["noise: mean rho between two draws"])) if "draws_rho" in rhos else None
    if text_only is not None:
        table["text-only documents skipped"] = [text_only.get(t, 0) for t in table["task"]]
    if paper is not None:
        table["paper's mean rho"] = [paper.get(t) for t in table["task"]]
    out.mkdir(parents=True, exist_ok=True)
    _paper.noted(rhos, note).to_csv(out / "rhos.csv", index=False)
    _paper.noted(table, note).to_csv(out / "summary.csv", index=False)
    figure = figures.save(figures.proxy_kde(rhos, form, threshold, note, noise=noise, paper=paper), figure_path)
    metrics = {**(extra or {}), "form": form, "threshold": threshold,
               **{f"mean_rho/{t}": float(g["rho"].mean()) for t, g in rhos.groupby("task")},
               **{f"samples/{t}": int(g["rho"].notna().sum()) for t, g in rhos.groupby("task")}}
    if noise:
        metrics |= {f"noise_draws_rho/{t}": float(v) for t, v in noise.items()}
    if "rho_exact" in rhos:
        metrics |= {f"mean_rho_exact/{t}": float(g["rho_exact"].mean()) for t, g in rhos.groupby("task")}
    if text_only is not None:
        metrics |= {f"text_only_skipped/{t}": n for t, n in text_only.items()}
    if paper:
        metrics |= {f"paper_mean_rho/{t}": v for t, v in paper.items()}
    if note:
        metrics["note"] = note
    write_json(metrics_path, metrics)
    return metrics, {"rhos": _paper.noted(rhos, note), "summary": _paper.noted(table, note)}, {"proxy_kde": figure}


def paper_rho(params: dict, tasks: list[str]) -> dict[str, float]:
    """The paper's mean rho (Fig. 2, analysis/paper_numbers.csv) of each task that fills one of its columns."""
    from analysis.paper import benchmark_of, paper_numbers

    numbers = paper_numbers()
    fig2 = numbers[(numbers["table"] == "fig2") & (numbers["metric"] == "mean_spearman_rho")]
    published = dict(zip(fig2["benchmark"], fig2["value"]))
    values = {}
    for task in tasks:
        try:
            benchmark = benchmark_of(task, params)
        except ValueError:  # a task the paper has no column for
            continue
        if benchmark in published:
            values[task] = float(published[benchmark])
    return values


def main(argv=None) -> None:
    p = parser(__doc__, "proxy")
    p.set_defaults(out=None, metrics=None, figures=None)  # the testbed's defaults, or inside --out (paper)
    args = p.parse_args(argv)
    if profile_of(args.params) == "paper":
        if not args.out:
            from .schema import read

            args.out = f"{read(args.params)['paper']['dir']}/outputs/proxy"
        with stage("proxy", args, ["zoo", "proxy", "paper"], ["out"]) as s:
            paper_profile(s)
        return
    args.out = args.out or "outputs/proxy"
    args.metrics = args.metrics or "outputs/metrics/proxy.json"
    args.figures = args.figures or "outputs/figures/proxy"
    with stage("proxy", args, ["zoo", "proxy"], ["out", "metrics", "figures"]) as s:
        cfg = s.params["proxy"]
        method = zoo_method(s.params["zoo"])
        model, processor = load_model(args.model)
        frozen(model)
        records = []
        n = cfg["samples"]
        for t, task in enumerate(cfg["tasks"]):  # disjoint images per task (a scene asks every family)
            for j, row in enumerate(tqdm(load_rows(args.data, task, n, offset=t * n), desc=f"proxy {task}", unit="img")):
                pixels = processor.image_processor(row["image"], return_tensors="pt")["pixel_values"]
                record = measure_image(model, pixels, method, s.params, exact=j < cfg["exact_samples"])
                records.append({"task": task, "id": row["id"], **record})
        metrics, tables, images = outputs(pd.DataFrame(records), cfg["form"], cfg["threshold"], weights_note(args.model),
                                          s.out["out"], s.out["metrics"], s.out["figures"] / "proxy_kde.png")
        s.log(metrics=metrics, tables=tables, images=images)


def paper_profile(s) -> None:
    """Fig. 2 under the paper profile (module docstring); ``skipped.json`` when the model is absent."""
    paper, cfg = s.params["paper"], s.params["proxy"]
    name, out = paper["proxy"]["model"], s.out["out"]
    spec = _paper.spec(s.params, name)
    if spec["architecture"] != LLAVA:
        raise StageError(f"paper.proxy.model = {name!r} is a {spec['architecture']}; the proxy walks LLaVA-1.5's CLIP "
                         f"vision tower one image at a time and measures only a {LLAVA} (LLaVA-1.5-7B in the paper)")
    record = _paper.availability(s.params, name)
    if not record["available"]:
        return _paper.skip(out, record, "proxy")
    model, processor = _paper.load(s.params, name, record)
    frozen(model)
    # the vision side (tower and projector) in float32, whatever paper.dtype: the encoder-side estimates are
    # finite differences and gradients, noise in half precision; the language model is not used here
    model.model.vision_tower.float()
    model.model.multi_modal_projector.float()
    method = zoo_method(s.params["zoo"], record.get("estimator"))
    records, text_only = [], {}
    for task in paper["proxy"]["tasks"]:
        text_only[task] = 0
        docs = _paper.task_documents(s.params, task, paper["proxy"]["samples"])
        for doc in tqdm(docs, desc=f"proxy {task}", unit="doc"):
            if not doc["images"]:  # MMMU has text-only questions: nothing to measure
                text_only[task] += 1
                continue
            image = doc["images"][0].convert("RGB")  # MMMU may have several: the first
            pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(paper["device"], torch.float32)
            records.append({"task": task, "id": doc["doc_id"], **measure_image(model, pixels, method, s.params)})
    if not records:
        raise StageError(f"no document of paper.proxy.tasks {paper['proxy']['tasks']} has an image")
    extra = {"model": name, "pretrained": record["pretrained"], "revision": record["revision"]}
    note = _paper.weights_note(record)
    metrics, tables, images = outputs(pd.DataFrame(records), cfg["form"], cfg["threshold"], note, out, out / "metrics.json",
                                      out / "figures" / "proxy_kde.png", paper=paper_rho(s.params, paper["proxy"]["tasks"]),
                                      extra=extra, text_only=text_only)
    s.log(metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))}, tables=tables, images=images)


if __name__ == "__main__":
    main()
