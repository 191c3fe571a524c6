"""Stand-in checkpoints of the paper's four models, for rehearsing the paper profile on CPU.

    python -m zoo_prune.rehearsal.checkpoints --out models/standins [--models llava-1.5-7b,qwen2.5-vl-7b]

For each model of paper/params.yaml ``paper.models`` this writes ``<out>/<model>/`` with ``save_pretrained``:
the same transformers class as the real checkpoint (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``) and a processor
configured like the real one, around tiny random-weight networks (``zoo_prune.tiny``): the real
image geometry (LLaVA: 336 px, patch 14, 576 visual tokens per image or patch; LLaVA-NeXT: the real
anyres grid pinpoints, up to 5 patches = 2880 tokens; Qwen2.5-VL: patch 14, 2 x 2 merge, window
attention over 112 px windows with full-attention blocks between, the real min / max pixels), so
token counts and the paper's budgets (192 / 128 / 64, 640 / 320 / 160, 20 % / 10 %) are the real
ones, while widths and depths are tiny. Each folder has a README that says RANDOM WEIGHTS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from .. import tiny
from ..testbed.questions import PLURALS, RELATIONS
from ..testbed.scenes import COLOURS, GLYPHS, SHAPES

# The real checkpoints' geometry (their config.json / preprocessor_config.json on the hub).
CLIP_336 = {"image_size": 336, "patch_size": 14}  # CLIP ViT-L/14-336: 24 x 24 = 576 tokens
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
QWEN_VISION = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112}
QWEN_PIXELS = (3136, 12845056)  # min_pixels = 56 * 56, max_pixels = 28 * 28 * 16384
QWEN_FULL_ATTENTION_EVERY = 8  # the real tower: 32 blocks, full attention in blocks 7, 15, 23, 31

STANDINS = {  # paper/params.yaml paper.models name -> (tiny family, build_tiny geometry, what is scaled down)
    "llava-1.5-7b": ("llava", dict(CLIP_336, text={"num_hidden_layers": 3}), "32 Vicuna layers -> 3"),
    "llava-1.5-13b": ("llava", dict(CLIP_336, text={"num_hidden_layers": 4}), "40 Vicuna layers -> 4"),
    "llava-next-7b": ("llava_next", dict(CLIP_336, grid_pinpoints=LLAVA_NEXT_PINPOINTS, text={"num_hidden_layers": 3}),
                      "32 Vicuna layers -> 3"),
    "qwen2.5-vl-7b": ("qwen2_5_vl", dict(patch_size=QWEN_VISION["patch_size"], pixels=QWEN_PIXELS,
                                          vision={**QWEN_VISION, "depth": 4, "fullatt_block_indexes": [1, 3]},
                                          text={"num_hidden_layers": 3}),
                      "32 vision blocks -> 4 (full attention in 1 and 3), 28 Qwen2.5 layers -> 3"),
}
TEXT = {"max_position_embeddings": 4096}  # LLaVA-NeXT's 2880 visual tokens and the prompt fit


def vocabulary() -> list[str]:
    """Words of the stand-in tasks' questions and lmms-eval's prompts (lower and capitalised), so that
    the word-level tiny tokenizer maps them to their own ids rather than ``<unk>``."""
    prompts = ("answer the question using a single word or phrase with option's letter from given choices directly "
               "please yes or no there are several options context question is in image what which how many colour "
               "shape digit box left above of the a an picture shows coloured shapes on cluttered background look at "
               "number plus equal to")
    words = [*tiny.WORDS, *prompts.replace("'", " ").split(), *COLOURS, *SHAPES, *PLURALS.values(), *GLYPHS,
             *" ".join(RELATIONS).split(), "A", "B", "C", "D", "E"]
    return list(dict.fromkeys(w for word in words for w in (word, word.capitalize())))


README = """# {name}: RANDOM WEIGHTS stand-in

**RANDOM WEIGHTS. Not {name}.** A tiny `{cls}` with random weights, written by
`python -m zoo_prune.rehearsal.checkpoints` (seed {seed}) to rehearse the paper profile on a CPU. Its
answers are noise; any number it produces says nothing about {name} or about pruning.

What is like the real checkpoint: the transformers class, the processor's image geometry
({geometry}), hence the number of visual tokens per image and the paper's budgets. What is not:
every width and depth ({scaled}; hidden size {hidden}), the weights, and the tokenizer (a
{vocab}-word word-level vocabulary).
"""


def _geometry(family: str, processor) -> str:
    images = processor.image_processor
    if family == "qwen2_5_vl":
        return (f"patch {images.patch_size}, {images.merge_size} x {images.merge_size} merge, min_pixels {images.size.shortest_edge}, "
                f"max_pixels {images.size.longest_edge}, window attention over {QWEN_VISION['window_size']} px windows")
    text = f"{images.crop_size['height']} px images, patch {processor.patch_size}"
    if family == "llava_next":
        text += f", anyres grid pinpoints {images.image_grid_pinpoints}"
    return text


def build_standin(name: str, out_dir, *, seed: int = 0) -> Path:
    """Write the stand-in of paper model ``name`` to ``out_dir`` (a folder for ``from_pretrained``)."""
    if name not in STANDINS:
        raise ValueError(f"no stand-in for model {name!r}; choose one of {list(STANDINS)}")
    family, geometry, scaled = STANDINS[name]
    geometry = dict(geometry)
    text = {**TEXT, **geometry.pop("text", {})}
    words = vocabulary()
    model, processor = tiny.build_tiny(family, seed=seed, text=text, tokenizer=tiny.tiny_tokenizer(words), **geometry)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if isinstance(processor, tiny.QwenProcessorWithoutVideo):
        # What the real repository holds: the image processor's preprocessor_config.json, the tokenizer and the
        # chat template; Qwen2_5_VLProcessor.from_pretrained adds its video processor (which needs torchvision).
        processor.image_processor.save_pretrained(out_dir)
        processor.tokenizer.save_pretrained(out_dir)
        (out_dir / "chat_template.jinja").write_text(processor.chat_template)
    else:
        processor.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(README.format(
        name=name, cls=type(model).__name__, seed=seed, geometry=_geometry(family, processor), scaled=scaled,
        hidden=model.config.get_text_config().hidden_size, vocab=len(words)))
    return out_dir


def build_standins(out_dir, models=tuple(STANDINS), *, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write the stand-ins of ``models`` under ``out_dir`` (one folder each); a failure leaves no partial output."""
    models = [models] if isinstance(models, str) else list(models)
    unknown = [m for m in models if m not in STANDINS]
    if unknown or not models:
        raise ValueError(f"no stand-in for model(s) {unknown or models!r}; choose from {list(STANDINS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"out_dir {str(out_dir)!r} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for i, name in enumerate(models):
            build_standin(name, tmp / name, seed=seed + i)
        (tmp / "standins.json").write_text(json.dumps({"generator": "zoo_prune.rehearsal.checkpoints", "seed": seed,
                                                       "models": models, "weights": "RANDOM"}, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: out_dir / name for name in models}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (e.g. models/standins)")
    parser.add_argument("--models", default=",".join(STANDINS), help="comma-separated paper models (default: all four)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        paths = build_standins(args.out, args.models.split(","), seed=args.seed, overwrite=args.overwrite)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"error: {error}") from None
    for name, path in paths.items():
        print(f"{name}: {path} (RANDOM WEIGHTS stand-in)")


if __name__ == "__main__":
    main()
