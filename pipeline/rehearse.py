"""``make rehearse``: the paper profile end to end on CPU stand-ins, through DVC, before a GPU hour is spent.

    python -m pipeline.rehearse              # stand-ins, rehearsal/params.yaml + plan, dvc repro rehearsal/dvc.yaml, checks
    python -m pipeline.rehearse --params-only   # only write rehearsal/params.yaml and rehearsal/plan.yaml

The rehearsal is a second folder of the same pipeline: ``rehearsal/dvc.yaml`` links to ``paper/dvc.yaml``,
and ``rehearsal/params.yaml`` is ``paper/params.yaml`` with the keys of ``rehearsal/overrides.yaml`` set (the
ones a user shrinks a run with: documents per task, budgets, seeds, device, the stand-ins' folders and
task names). Stand-ins: ``zoo_prune.rehearsal.checkpoints`` (tiny random-weight checkpoints of the real
classes and geometry) and ``zoo_prune.rehearsal.tasks`` (small local datasets read by lmms-eval's own task
YAMLs). Every page and figure of its report says RANDOM-WEIGHT REHEARSAL.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .schema import load_yaml, merge

HEADER = ("# Written by `python -m pipeline.rehearse` from paper/params.yaml and rehearsal/overrides.yaml: do not edit\n"
          "# (edit those). The paper profile on CPU stand-ins; `dvc repro rehearsal/dvc.yaml` runs it.\n")


def write_params(paper="paper/params.yaml", overrides="rehearsal/overrides.yaml", out="rehearsal/params.yaml") -> Path:
    """``out`` = ``paper`` with ``overrides``' keys set (mappings merge key by key), based on the same root params."""
    paper_raw, over = load_yaml(paper) or {}, load_yaml(overrides) or {}
    params = {"base": paper_raw["base"], "profile": paper_raw["profile"]}
    for key in ("wandb", "paper"):
        params[key] = merge(paper_raw.get(key, {}), over.get(key, {}))
    out = Path(out)
    out.write_text(HEADER + yaml.safe_dump(params, sort_keys=False, width=120))
    return out


def main(argv=None) -> None:
    from . import plan

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params-only", action="store_true", help="write rehearsal/params.yaml and its plan, run nothing")
    args = p.parse_args(argv)
    path = write_params()
    plan.write(path)
    if args.params_only:
        return


if __name__ == "__main__":
    main()
