"""Stage ``checkpoints`` (paper profile): where one model's weights are, and which revision, without downloading.

    python -m pipeline.checkpoints --params paper/params.yaml --paper-model llava-1.5-7b \\
        --out paper/outputs/checkpoints/llava-1.5-7b/checkpoint.json

Writes ``pipeline._paper.resolve``'s record (model, pretrained, architecture, budgets, available, local path,
revision, the reason when absent). DVC runs it every time (``always_changed``); the record changes only when
the checkpoint appears, goes or changes revision, and only then do that model's entries rerun. An absent
checkpoint is not an error here: the model's stages skip it by name.
"""

from __future__ import annotations

from . import _paper
from ._common import StageError, parser, stage, write_json


def main(argv=None) -> None:
    p = parser(__doc__, inputs=())
    p.add_argument("--paper-model", required=True, help="a model of params paper.models")
    p.add_argument("--out", required=True, help="the record (JSON)")
    args = p.parse_args(argv)
    with stage(f"checkpoints/{args.paper_model}", args, ["paper"], ["out"]) as s:
        record = _paper.availability(s.params, args.paper_model)
        write_json(s.out["out"], record)
        if record["available"]:
            _paper.log.info("%s: %s (revision %s)", args.paper_model, record["path"], record["revision"])
        else:
            _paper.log.warning("%s: absent, its stages will be skipped: %s", args.paper_model, record["reason"])
        s.log(metrics={"available": int(record["available"])})


if __name__ == "__main__":
    try:
        main()
    except StageError as error:
        raise SystemExit(f"error: {error}") from error
