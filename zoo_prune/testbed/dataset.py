"""Build the testbed's splits, save them with ``datasets`` and write a JSON card.

Layout of ``out_dir``::

    card.json                 how the data was made: version, seeds, sizes, vocabularies, counts
    scenes/                   DatasetDict train / validation / test, one row per image (training)
    tasks/<family>/           DatasetDict validation / test, one row per question (lmms-eval tasks)

Splits come from disjoint seed ranges: image i of split s under dataset seed d is
``generate_scene(d * 3_000_000 + SPLITS.index(s) * 1_000_000 + i)``.

CLI: ``python -m zoo_prune.testbed.dataset --out data/testbed [--sheet /tmp/testbed.png]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .._checks import check_int
from . import scenes as sc
from .questions import ANSWERS, FAMILIES, METRICS, PLURALS, RELATIONS, TEMPLATES, ask, check_families
from .scenes import Scene, generate_scene

GENERATOR_VERSION = "1.0"  # bump whenever the pixels or questions of a seed change
SPLITS = ("train", "validation", "test")
SEEDS_PER_SPLIT = 1_000_000
DEFAULT_SIZES = {"train": 4000, "validation": 200, "test": 300}  # images per split
DEFAULT_PER_FAMILY = {"train": 6, "validation": 1, "test": 1}  # questions per family per image (at most)
TASK_SPLITS = ("validation", "test")  # the splits written per family for evaluation


def split_seeds(split: str, size: int, seed: int = 0) -> range:
    """The scene seeds of a split: disjoint blocks of SEEDS_PER_SPLIT per split and dataset seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if check_int(f"size of split {split!r}", size, minimum=0) > SEEDS_PER_SPLIT:
        raise ValueError(f"size of split {split!r} must be <= {SEEDS_PER_SPLIT}, got {size}")
    check_int("seed", seed, minimum=0)
    start = (seed * len(SPLITS) + SPLITS.index(split)) * SEEDS_PER_SPLIT
    return range(start, start + size)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def features():
    """``datasets`` schemas of the scene rows and the task rows."""
    from datasets import Features, Image as ImageFeature, List, Value

    question = {"family": Value("string"), "question": Value("string"), "answer": Value("string"),
                "objects": List(Value("int32"))}
    scene = Features({
        "seed": Value("int64"),
        "image": ImageFeature(),
        "object_map": ImageFeature(),  # mode L: 0 background, i + 1 for objects[i]
        "background": Value("string"),
        "group_shape": Value("string"),
        "objects": List({"shape": Value("string"), "colour": Value("string"), "glyph": Value("string"),
                         "bbox": List(Value("int32"))}),
        **{f"patch_{key}": List(Value("int8")) for key in ("object", "colour", "shape", "glyph")},
        "questions": List(question),
    })
    task = Features({"id": Value("string"), "seed": Value("int64"), "image": ImageFeature(),
                     **question, "patch_object": List(Value("int8"))})
    return scene, task


def scene_row(scene: Scene, questions: list[dict], patch_size: int, min_coverage: float) -> dict:
    labels = scene.patch_labels(patch_size, min_coverage)
    return {
        "seed": scene.seed,
        "image": {"bytes": png_bytes(scene.image), "path": None},
        "object_map": {"bytes": png_bytes(scene.object_map), "path": None},
        "background": scene.background,
        "group_shape": scene.group_shape,
        "objects": [o.as_dict() for o in scene.objects],
        **{f"patch_{key}": labels[key].tolist() for key in ("object", "colour", "shape", "glyph")},
        "questions": questions,
    }


def task_rows(split: str, row: dict) -> list[dict]:
    """One row per question of a scene row, numbered within its family."""
    seen = Counter()
    rows = []
    for q in row["questions"]:
        rows.append({"id": f"{split}-{row['seed']}-{q['family']}-{seen[q['family']]}", "seed": row["seed"],
                     "image": row["image"], **q, "patch_object": row["patch_object"]})
        seen[q["family"]] += 1
    return rows


def check_config(image_size, patch_size, sizes, per_family, families, min_coverage) -> None:
    sc.check_image_size(image_size, patch_size)
    check_families(families)
    for name, mapping in (("sizes", sizes), ("per_family", per_family)):
        unknown = set(mapping) - set(SPLITS)
        if unknown:
            raise ValueError(f"{name} has unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    for split, k in per_family.items():
        check_int(f"per_family[{split!r}]", k)
    if not any(sizes.values()):
        raise ValueError(f"every split is empty: sizes={sizes}")
    sc.check_coverage(min_coverage)


def card(config: dict, rows: dict[str, list[dict]]) -> dict:
    """The JSON card: how the splits were made and what they contain (deterministic: no times)."""
    import datasets
    import PIL

    image_size, patch_size = config["image_size"], config["patch_size"]
    splits = {}
    for split, split_rows in rows.items():
        per_family = {}
        for family in config["families"]:
            answers = Counter(q["answer"] for r in split_rows for q in r["questions"] if q["family"] == family)
            per_family[family] = {"questions": sum(answers.values()), "answers": dict(sorted(answers.items()))}
        digest = hashlib.sha256(b"".join(r["image"]["bytes"] for r in split_rows)).hexdigest()
        seeds = split_seeds(split, len(split_rows), config["seed"])
        splits[split] = {"seeds": [seeds.start, seeds.stop], "images": len(split_rows),
                         "questions_per_family": config["per_family"][split], "families": per_family,
                         "images_sha256": digest}
    return {
        "name": "zoo-prune testbed",
        "generator_version": GENERATOR_VERSION,
        "config": config,
        "tokens_per_image": (image_size // patch_size) ** 2,
        "seeding": "scene i of split s under dataset seed d: numpy Generator(PCG64(seed)) with "
                   f"seed = (d * {len(SPLITS)} + index of s in {list(SPLITS)}) * {SEEDS_PER_SPLIT} + i; "
                   f"questions of family f: Generator(PCG64([seed, 1 + index of f in {list(FAMILIES)}]))",
        "layout_on_disk": {"card.json": "this card",
                           "scenes": f"DatasetDict {list(rows)}: one row per image with every question",
                           "tasks/<family>": f"DatasetDict {[s for s in TASK_SPLITS if s in rows]}: "
                                             "one row per question"},
        "families": {f: {"metric": METRICS[f], "templates": list(TEMPLATES[f]), "answers": list(ANSWERS[f])}
                     for f in config["families"]},
        "splits": splits,
        "vocabularies": {
            "colours": {name: list(rgb) for name, rgb in sc.COLOURS.items()},
            "shapes": list(sc.SHAPES), "plurals": PLURALS, "glyphs": list(sc.GLYPHS), "relations": list(RELATIONS),
            "patch_colour": list(sc.PATCH_COLOURS), "patch_shape": list(sc.PATCH_SHAPES),
            "patch_glyph": list(sc.PATCH_GLYPHS),
            "backgrounds": list(sc.BACKGROUNDS), "clutter": list(sc.CLUTTER),
        },
        "scene_layout": {
            "group_size": [0, sc.MAX_GROUP], "singles": list(sc.SINGLES), "boxes": list(sc.BOXES),
            "shape_side_px": list(sc.shape_size_range(image_size)), "box_wh_px": list(sc.box_size(image_size)),
            "glyph_cell_px": sc.glyph_scale(image_size), "gap_px": sc.object_gap(image_size),
        },
        "columns": {
            "scenes": "seed, image (PNG), object_map (PNG, mode L: 0 background, i + 1 = objects[i]), background, "
                      "group_shape, objects [{shape, colour, glyph, bbox [x0, y0, x1, y1) px}], "
                      f"patch_object / patch_colour / patch_shape / patch_glyph ({(image_size // patch_size) ** 2} "
                      "per image, raster order; object: 0 or i + 1; the others index the patch_* vocabularies, "
                      f"0 = none; a patch is an object's if it covers >= {config['min_coverage']} of it, the most), "
                      "questions [{family, question, answer, objects (indices the answer depends on)}]",
            "tasks": "id, seed, image, family, question, answer, objects, patch_object",
        },
        "versions": {"numpy": np.__version__, "pillow": PIL.__version__, "datasets": datasets.__version__},
    }


def build_splits(out_dir, *, image_size: int = 96, patch_size: int = 4, sizes: dict | None = None,
                 per_family: dict | None = None, families=FAMILIES, seed: int = 0, min_coverage: float = 0.25,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Generate every split, save scenes/ and tasks/<family>/ and card.json under ``out_dir``; return the card.

    ``sizes`` and ``per_family`` override DEFAULT_SIZES / DEFAULT_PER_FAMILY per split (a size of 0
    drops the split). Written to a temporary sibling and renamed, so a failure leaves no partial output.
    """
    import datasets
    from datasets import Dataset, DatasetDict

    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    per_family = {**DEFAULT_PER_FAMILY, **(per_family or {})}
    families = check_families(families)
    check_config(image_size, patch_size, sizes, per_family, families, min_coverage)
    seeds = {split: split_seeds(split, sizes[split], seed) for split in SPLITS if sizes[split]}
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"out_dir {str(out_dir)!r} exists; pass overwrite=True (--overwrite) to replace it")

    rows = {}
    for split, split_range in seeds.items():
        rows[split] = []
        for s in tqdm(split_range, desc=f"testbed {split}", disable=not progress, unit="img"):
            scene = generate_scene(s, image_size)
            rows[split].append(scene_row(scene, ask(scene, families, per_family[split]), patch_size, min_coverage))

    config = {"image_size": image_size, "patch_size": patch_size, "sizes": {s: len(r) for s, r in rows.items()},
              "per_family": {s: per_family[s] for s in rows}, "families": list(families), "seed": seed,
              "min_coverage": min_coverage}
    result = card(config, rows)
    scene_features, task_features = features()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one "Saving" bar per split and family: noise
    try:
        DatasetDict({s: Dataset.from_list(r, features=scene_features) for s, r in rows.items()}).save_to_disk(
            str(tmp / "scenes"))
        for family in families:
            tasks = {s: [t for r in rows[s] for t in task_rows(s, r) if t["family"] == family]
                     for s in TASK_SPLITS if s in rows}
            if tasks:
                DatasetDict({s: Dataset.from_list(t, features=task_features) for s, t in tasks.items()}).save_to_disk(
                    str(tmp / "tasks" / family))
        (tmp / "card.json").write_text(json.dumps(result, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars_were_on:
            datasets.enable_progress_bars()
    return result


def load_split(data_dir, folder: str, split: str, limit: int | None = None):
    """The rows of ``split`` in ``data_dir/<folder>`` as :func:`build_splits` wrote them, the first ``limit``.

    ``folder``: ``"scenes"`` (one row per image with all its questions) or ``"tasks/<family>"`` (one row per question).
    """
    from datasets import load_from_disk

    path = Path(data_dir) / folder
    if not path.exists():
        raise FileNotFoundError(f"no {folder} under {data_dir}; build it with python -m zoo_prune.testbed.dataset --out {data_dir}")
    rows = load_from_disk(str(path))[split]
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def contact_sheet(path, seeds=range(2_000_000, 2_000_008), image_size: int = 96, patch_size: int = 4,
                  families=FAMILIES, min_coverage: float = 0.25) -> Path:
    """A PNG of a few scenes: each image, its per-patch object labels, and its questions and answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(seeds)
    grid = image_size // patch_size
    fig, axes = plt.subplots(len(seeds), 3, figsize=(9, 2.3 * len(seeds)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1.6]})
    for (ax_image, ax_labels, ax_text), s in zip(axes, seeds):
        scene = generate_scene(s, image_size)
        palette = np.array([(40, 40, 40)] + [sc.COLOURS[o.colour] for o in scene.objects], dtype=np.uint8)
        ax_image.imshow(scene.image, interpolation="nearest")
        ax_image.set_title(f"seed {s}: {scene.background}", fontsize=7)
        ax_labels.imshow(palette[scene.patch_labels(patch_size, min_coverage)["object"].reshape(grid, grid)],
                         interpolation="nearest")
        ax_labels.set_title(f"patch_object ({grid}x{grid} patches of {patch_size})", fontsize=7)
        text = "\n".join(f"{q['family']:>9}: {q['question']}  -> {q['answer']}" for q in ask(scene, families, 1))
        ax_text.text(0, 0.5, text, fontsize=7, va="center", family="monospace")
        for ax in (ax_image, ax_labels, ax_text):
            ax.set_xticks([])
            ax.set_yticks([])
        ax_text.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output folder (scenes/, tasks/<family>/, card.json)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--patch-size", type=int, default=4)
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=DEFAULT_SIZES[split], help=f"images in {split}")
    parser.add_argument("--train-per-family", type=int, default=DEFAULT_PER_FAMILY["train"],
                        help="questions per family per training image")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), metavar="FAMILY")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (shifts every split's seed range)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--sheet", help="also write a contact sheet PNG of a few test scenes here")
    args = parser.parse_args(argv)
    if not args.out and not args.sheet:
        parser.error("give --out and/or --sheet")
    try:
        if args.out:
            start = time.perf_counter()
            result = build_splits(args.out, image_size=args.image_size, patch_size=args.patch_size,
                                  sizes={s: getattr(args, s) for s in SPLITS},
                                  per_family={"train": args.train_per_family}, families=args.families,
                                  seed=args.seed, overwrite=args.overwrite)
            counts = {s: v["images"] for s, v in result["splits"].items()}
            print(f"wrote {args.out} ({counts} images) in {time.perf_counter() - start:.1f} s")
        if args.sheet:
            test_seeds = split_seeds("test", 8, args.seed)
            print("wrote", contact_sheet(args.sheet, test_seeds, args.image_size, args.patch_size, args.families))
    except (ValueError, TypeError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
