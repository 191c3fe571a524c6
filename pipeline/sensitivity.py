"""Stage ``sensitivity``: every estimator's per-token sensitivities on a sample set, their agreement
(Spearman table), and DivPrune vs ZOO-Prune kept-token overlays at every budget (paper Fig. 6 / B).

Outputs: ``--out`` (sensitivities.npz: estimator -> (samples, N); agreement.csv; timing.csv),
``--metrics`` (JSON), ``--figures`` (agreement.png, overlays.png).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import figures, stats

from ._common import load_model, load_rows, parser, stage, weights_note, write_json


@torch.no_grad()
def projector_io(model, processor, image, question: str) -> tuple[dict, torch.Tensor]:
    """(processor inputs, X): what the model feeds its projector for one image (one forward of its vision side)."""
    from zoo_prune import adapter_for
    from zoo_prune.tiny import chat_prompt

    inputs = processor(images=image, text=chat_prompt(processor, question), return_tensors="pt")
    features, _ = adapter_for(model).features(inputs)
    return inputs, features[0].float()


@torch.no_grad()
def kept_and_answer(model, processor, inputs, method: str, keep: int, options: dict) -> tuple[torch.Tensor, str]:
    """Indices kept by ``method`` at ``keep`` and the model's answer with them (``apply_pruning``)."""
    from zoo_prune import apply_pruning
    from zoo_prune.testbed.evaluate import normalise

    with apply_pruning(model, method, keep=keep, **options) as handle:
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        kept = handle.kept_indices[0]
    return kept, normalise(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def main(argv=None) -> None:
    p = parser(__doc__, "sensitivity")
    args = p.parse_args(argv)
    with stage("sensitivity", args, ["zoo", "budgets", "sensitivity"], ["out", "metrics", "figures"]) as s:
        from zoo_prune import adapter_for, zo_sensitivity
        from zoo_prune.demo import token_views

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
            for name in estimators:
                start = time.perf_counter()
                scores[name].append(zo_sensitivity(projector, x, m=zoo["m"], h=zoo["h"], seed=zoo["seed"], estimator=name,
                                                   rank=cfg["rank"]).numpy())
                seconds[name] += time.perf_counter() - start
        table = stats.agreement(scores)
        timing = pd.DataFrame({"estimator": estimators, "ms_per_image": [1000 * seconds[n] / len(rows) for n in estimators]})

        note = weights_note(args.model)
        panels = []
        options = {"zoo": {k: zoo[k] for k in ("m", "h", "estimator", "seed")}, "divprune": {}}
        overlays = samples[:cfg["overlay_samples"]]
        for row, inputs in tqdm(overlays, desc="sensitivity: overlays", unit="img"):
            columns, view = [], None
            for keep in budgets:
                for method in ("divprune", "zoo"):
                    kept, answer = kept_and_answer(model, processor, inputs, method, keep, options[method])
                    [(_, view, mask)] = token_views(model, processor, row["image"], inputs, kept)
                    columns.append((f"{method} {keep}", mask, answer))
            panels.append({"title": f"{row['question']} -> {row['answer']}", "view": view, "panels": columns})

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


if __name__ == "__main__":
    main()
