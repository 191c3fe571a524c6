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
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import figures, stats

from ._common import StageError, load_model, load_rows, parser, stage, weights_note, write_json


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
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(x.shape[1] - 1)
    for j in range(q):
        w = torch.randn(z.shape, generator=generator)
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
    squared = torch.zeros(n, dtype=embeds.dtype)
    base = embeds.detach()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        for start in range(0, len(jobs), chunk):
            part = jobs[start:start + chunk]
            tangent = torch.zeros(len(part), *base.shape[1:], dtype=base.dtype)
            rows = torch.tensor([i for i, _ in part])
            tangent[torch.arange(len(part)), 1 + rows, torch.tensor([k for _, k in part])] = 1
            _, dz = jvp(lambda x: vision_side(model, x), (base.expand(len(part), -1, -1).clone(),), (tangent,))
            squared.index_add_(0, rows, dz.pow(2).flatten(1).sum(1).to(squared.dtype))
    result = torch.full((n,), float("nan"), dtype=embeds.dtype)
    result[tokens] = squared[tokens].sqrt()
    return result


@torch.no_grad()
def encoder_finite_difference(model, embeds: torch.Tensor, m: int, h: float, seed: int, chunk: int = 64) -> torch.Tensor:
    """(N,) mean over m unit directions of ||Z(x_i + h u) - Z(x_i - h u)||_F / 2h, over all output tokens."""
    from zoo_prune import draw_directions

    n, width = embeds.shape[1] - 1, embeds.shape[2]
    u = draw_directions(m, width, seed=seed).to(embeds.dtype)
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
        return encoder_exact(model, embeds, np.flatnonzero(kept)).numpy()
    if form == "backward":
        return encoder_backward(model, embeds, cfg["directions"], seed).numpy()
    return encoder_finite_difference(model, embeds, zoo["m"], zoo["h"], seed).numpy()


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


def main(argv=None) -> None:
    p = parser(__doc__, "proxy")
    args = p.parse_args(argv)
    with stage("proxy", args, ["zoo", "proxy"], ["out", "metrics", "figures"]) as s:
        from zoo_prune import adapter_for, get_method
        from zoo_prune.adapters import record_io

        cfg, zoo = s.params["proxy"], s.params["zoo"]
        form, threshold, exact_samples = cfg["form"], cfg["threshold"], cfg["exact_samples"]
        method = get_method("zoo", **{k: zoo[k] for k in ("m", "h", "estimator", "seed")})
        model, processor = load_model(args.model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        embeddings = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).embeddings
        projector = adapter_for(model).projector
        records = []
        n = cfg["samples"]
        for t, task in enumerate(cfg["tasks"]):  # disjoint images per task (a scene asks every family)
            for j, row in enumerate(tqdm(load_rows(args.data, task, n, offset=t * n), desc=f"proxy {task}", unit="img")):
                pixels = processor.image_processor(row["image"], return_tensors="pt")["pixel_values"]
                with torch.no_grad(), record_io(projector) as io:
                    embeds = embeddings(pixels)
                    model.model.get_image_features(pixel_values=pixels)
                    if not torch.allclose(vision_side(model, embeds), io["output"], atol=1e-4):
                        raise StageError("proxy.vision_side does not reproduce the model's image features "
                                         f"({type(model.model.vision_tower).__name__}); it cannot measure this model")
                projector_s = method.sensitivity(io["input"][0].float(), projector).numpy()
                kept = stats.proxy_mask(projector_s, threshold)
                encoder_s = measure(form, model, embeds, kept, s.params, zoo["seed"])
                rho, n_kept = stats.proxy_rho(projector_s, encoder_s, threshold)
                record = {"task": task, "id": row["id"], "rho": rho, "tokens_kept": n_kept}
                if form != "exact":  # the sampled form's own noise: a second, independent draw
                    second = measure(form, model, embeds, kept, s.params, zoo["seed"] + 1)
                    record |= {"rho_second_draw": stats.proxy_rho(projector_s, second, threshold)[0],
                               "draws_rho": stats.spearman(encoder_s[kept], second[kept])}
                    if j < exact_samples:
                        exact = measure("exact", model, embeds, kept, s.params, zoo["seed"])
                        record |= {"rho_exact": stats.proxy_rho(projector_s, exact, threshold)[0],
                                   "sampled_vs_exact": stats.spearman(encoder_s[kept], exact[kept])}
                records.append(record)
        rhos = pd.DataFrame(records)
        table = summary(rhos, form)
        note = weights_note(args.model)
        s.out["out"].mkdir(parents=True)
        rhos.to_csv(s.out["out"] / "rhos.csv", index=False)
        table.to_csv(s.out["out"] / "summary.csv", index=False)
        noise = dict(zip(table["task"], table["noise: mean rho between two draws"])) if "draws_rho" in rhos else None
        figure = figures.save(figures.proxy_kde(rhos, form, threshold, note, noise=noise), s.out["figures"] / "proxy_kde.png")
        metrics = {"form": form, "threshold": threshold,
                   **{f"mean_rho/{t}": float(g["rho"].mean()) for t, g in rhos.groupby("task")},
                   **{f"samples/{t}": int(g["rho"].notna().sum()) for t, g in rhos.groupby("task")}}
        if noise:
            metrics |= {f"noise_draws_rho/{t}": float(v) for t, v in noise.items()}
        if "rho_exact" in rhos:
            metrics |= {f"mean_rho_exact/{t}": float(g["rho_exact"].mean()) for t, g in rhos.groupby("task")}
        write_json(s.out["metrics"], metrics)
        s.log(metrics=metrics, tables={"rhos": rhos, "summary": table}, images={"proxy_kde": figure})


if __name__ == "__main__":
    main()
