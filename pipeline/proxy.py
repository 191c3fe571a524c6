"""Stage ``proxy``: is the projector a proxy for the whole vision side? (method.md section 5, paper Fig. 2)

Per sample: the projector sensitivity of each visual token (ZOO-Prune's own, ``zoo`` params) and its
end-to-end sensitivity through the vision encoder: the token's row of the encoder's input sequence
(patch + position embedding) perturbed, encoder and projector run, the change measured over all
output tokens. ``proxy.form``: ``finite_difference`` (||Z(+) - Z(-)||_F / 2h averaged over ``zoo.m``
unit directions: 2 N m encoder passes) or ``backward`` (the root of the unbiased estimate
E_w ||d(w.Z)/dx_i||^2 = ||J_i||_F^2 from ``proxy.directions`` vector-Jacobian products, all tokens
at once; rank-equivalent to the h -> 0 limit). Both min-max normalised; tokens whose normalised
projector sensitivity is below ``proxy.threshold`` dropped; Spearman's rho over the rest.
"""

from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import figures, stats

from ._common import StageError, load_model, load_rows, need, parser, stage, weights_note, write_json


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
    return model.model.multi_modal_projector(hidden[:, 1:])


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


def main(argv=None) -> None:
    p = parser(__doc__, "proxy")
    args = p.parse_args(argv)
    with stage("proxy", args, ["zoo", "proxy"], ["out", "metrics", "figures"]) as s:
        from zoo_prune import get_method
        from zoo_prune.adapters import record_io

        cfg, zoo = s.params["proxy"], s.params["zoo"]
        form = need(cfg, "proxy", "form", str, ("backward", "finite_difference"))
        threshold = need(cfg, "proxy", "threshold", float)
        q = need(cfg, "proxy", "directions", int)
        method = get_method("zoo", **{k: zoo[k] for k in ("m", "h", "estimator", "seed")})
        model, processor = load_model(args.model)
        embeddings = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).embeddings
        projector = model.model.multi_modal_projector
        records = []
        n = need(cfg, "proxy", "samples", int)
        for t, task in enumerate(need(cfg, "proxy", "tasks", list)):  # disjoint images per task (a scene asks every family)
            for row in tqdm(load_rows(args.data, task, n, offset=t * n), desc=f"proxy {task}", unit="img"):
                pixels = processor.image_processor(row["image"], return_tensors="pt")["pixel_values"]
                with torch.no_grad(), record_io(projector) as io:
                    embeds = embeddings(pixels)
                    model.model.get_image_features(pixel_values=pixels)
                    if not torch.allclose(vision_side(model, embeds), io["output"], atol=1e-4):
                        raise StageError("proxy.vision_side does not reproduce the model's image features "
                                         f"({type(model.model.vision_tower).__name__}); it cannot measure this model")
                projector_s = method.sensitivity(io["input"][0].float(), projector).numpy()
                encoder_s = (encoder_backward(model, embeds, q, zoo["seed"]) if form == "backward" else
                             encoder_finite_difference(model, embeds, zoo["m"], zoo["h"], zoo["seed"])).numpy()
                rho, kept = stats.proxy_rho(projector_s, encoder_s, threshold)
                records.append({"task": task, "id": row["id"], "rho": rho, "tokens_kept": kept})
        rhos = pd.DataFrame(records)
        note = weights_note(args.model)
        s.out["out"].mkdir(parents=True)
        rhos.to_csv(s.out["out"] / "rhos.csv", index=False)
        figure = figures.save(figures.proxy_kde(rhos, form, threshold, note), s.out["figures"] / "proxy_kde.png")
        metrics = {"form": form, "threshold": threshold,
                   **{f"mean_rho/{t}": float(g["rho"].mean()) for t, g in rhos.groupby("task")},
                   **{f"samples/{t}": int(g["rho"].notna().sum()) for t, g in rhos.groupby("task")}}
        write_json(s.out["metrics"], metrics)
        s.log(metrics=metrics, tables={"rhos": rhos}, images={"proxy_kde": figure})


if __name__ == "__main__":
    main()
