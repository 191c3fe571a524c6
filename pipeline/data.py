"""Stage ``data``: the synthetic testbed (``zoo_prune.testbed.dataset.build_splits``), atomically."""

from __future__ import annotations

from ._common import parser, stage


def main(argv=None) -> None:
    p = parser(__doc__, inputs=())
    p.add_argument("--out", default="data/testbed")
    args = p.parse_args(argv)
    with stage("data", args, ["data"], outputs=["out"]) as s:
        from zoo_prune.testbed.dataset import build_splits

        params = s.params["data"]
        sizes = {split: params[split] for split in ("train", "validation", "test")}
        card = build_splits(s.out["out"], sizes=sizes, per_family={"train": params["train_per_family"]}, seed=params["seed"])
        s.log(metrics={f"images/{k}": v["images"] for k, v in card["splits"].items()})


if __name__ == "__main__":
    main()
