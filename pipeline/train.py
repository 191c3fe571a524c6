"""Stage ``train``: the testbed model (``python -m zoo_prune.testbed.train``), written to a temp folder, then renamed.

The trained model is committed to git (an output with ``cache: false``), and the stage depends on
the data's ``card.json`` (deterministic) rather than its folder (whose Arrow metadata is not), so
``dvc repro`` on a fresh clone finds it up to date and never retrains unless its inputs change.
The folder's hand-written model card (``README.md``) is carried over to the new folder when the
training config is the one it describes (the same ``training_log.json`` config), else dropped with a notice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ._common import parser, stage


def carry_card(old: Path, new: Path, config: dict) -> None:
    """Copy ``old/README.md`` into ``new`` if ``old``'s training config equals ``config``."""
    card, log = old / "README.md", old / "training_log.json"
    if not card.exists():
        return
    if log.exists() and json.loads(log.read_text()).get("config") == config:
        shutil.copy2(card, new / "README.md")
        print(f"model card {card} kept: same training config")
    else:
        print(f"model card {card} dropped: it describes another training config; write one for the new model")


def main(argv=None) -> None:
    p = parser(__doc__, inputs=("data",))
    p.add_argument("--out", default="models/testbed-llava")
    args = p.parse_args(argv)
    with stage("train", args, ["train"], outputs=["out"]) as s:
        from zoo_prune.testbed import train

        params = s.params["train"]
        if not (Path(args.data) / "card.json").exists():
            raise FileNotFoundError(f"no testbed data under {args.data}; run the data stage first")
        cli = ["--data", args.data, "--out", str(s.out["out"])]
        for key, value in params.items():  # every key is a flag of the training CLI, which names an unknown one
            cli += [f"--{key.replace('_', '-')}", str(value)]
        train.main(cli)
        info = json.loads((s.out["out"] / "training_log.json").read_text())
        carry_card(Path(args.out), s.out["out"], info["config"])
        s.log(metrics={f"validation/{k}": v for k, v in info.get("validation", {}).items()},
              images={"loss_curve": s.out["out"] / "loss_curve.png"})


if __name__ == "__main__":
    main()
