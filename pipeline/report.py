"""Stage ``report``: one markdown page (``outputs/report/README.md``) with every table (markdown, and
CSV next to it) and every figure of the pipeline, copied into the report folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from analysis import stats

from ._common import parser, stage, weights_note, write_json

# (title, table CSV under outputs/, figures under outputs/figures/) in reading order
SECTIONS = [
    ("Results (paper Tables 1-4 form)", "results/table.csv", ["results/avg_vs_tokens.png"]),
    ("Ablation of the selection score (Table 5)", "ablation/table.csv", ["ablation/ablation.png"]),
    ("Step size h (Fig. 4a)", "sweep_h/sweep.csv", ["sweep_h/sweep_h.png"]),
    ("Directions m (Fig. 4b)", "sweep_m/sweep.csv", ["sweep_m/sweep_m.png"]),
    ("Projector as a proxy for the encoder (Fig. 2)", None, ["proxy/proxy_kde.png"]),
    ("Sensitivity estimators: agreement", "sensitivity/agreement.csv", ["sensitivity/agreement.png"]),
    ("Kept tokens (Fig. 6 / Fig. B)", None, ["sensitivity/overlays.png"]),
    ("Efficiency on the testbed, measured (Fig. 5)", "efficiency/testbed.csv", ["efficiency/prefill.png", "efficiency/e2e.png"]),
    ("Paper models: FLOPs by formula (Fig. A, App. D check)", "efficiency/paper_flops.csv",
     ["efficiency/flops_llava_next_7b.png"]),
    ("One 7B-width decoder layer on this CPU", "efficiency/layer_cpu.csv", ["efficiency/layer_cpu.png"]),
]


def main(argv=None) -> None:
    p = parser(__doc__, inputs=("model",))
    p.add_argument("--outputs", default="outputs")
    p.add_argument("--out", default="outputs/report")
    args = p.parse_args(argv)
    with stage("report", args, [], ["out"]) as s:
        root, out = Path(args.outputs), s.out["out"]
        (out / "figures").mkdir(parents=True)
        note = weights_note(args.model)
        lines = ["# zoo-prune: experiment report", "", f"Profile `{s.profile}`, model `{args.model}`."]
        if note:
            lines += ["", f"**{note}**"]
        metrics = {}
        for title, table, images in SECTIONS:
            lines += ["", f"## {title}", ""]
            if table:
                data = pd.read_csv(root / table)
                name = table.replace("/", "_")
                data.to_csv(out / name, index=False)
                lines += [stats.markdown_table(data.set_index(data.columns[0])), f"CSV: [{name}]({name})", ""]
            for image in images:
                source = root / "figures" / image
                if not source.exists():
                    raise FileNotFoundError(f"figure {source} not found; run the stage that draws it (dvc repro)")
                target = image.replace("/", "_")
                shutil.copy(source, out / "figures" / target)
                lines.append(f"![{title}](figures/{target})")
        for path in sorted((root / "metrics").glob("*.json")):
            metrics[path.stem] = json.loads(path.read_text())
        (out / "README.md").write_text("\n".join(lines) + "\n")
        write_json(out / "metrics.json", metrics)
        s.log(images={p.stem: p for p in sorted((out / "figures").glob("*.png"))})


if __name__ == "__main__":
    main()
