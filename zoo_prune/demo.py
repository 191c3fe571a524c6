"""Prune one image's visual tokens with one or more methods, print the answers, draw the kept tokens.

    python -m zoo_prune.demo --model llava-hf/llava-1.5-7b-hf --image cat.jpg \\
        --question "What is in the image?" --method zoo --method divprune --keep 64 --out demo.png
    python -m zoo_prune.demo --tiny llava --image cat.jpg --question "what is in the image?" --keep 16

Each method gets a panel of the image as the model saw it, pruned tokens dimmed and kept ones at
full brightness (the paper's Fig. 6 style). ``--tiny FAMILY`` builds a small random-weight model
locally (:mod:`zoo_prune.tiny`; its answers are noise) instead of loading a checkpoint.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from .adapters import adapter_for
from .methods import get_method
from .pruned_model import apply_pruning

DIM = 0.25  # brightness of a pruned token's patch


def parse_keep(text: str) -> int | float:
    """``64`` -> 64 tokens, ``0.2`` -> a ratio."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def load(args):
    """(model, processor) from ``--tiny`` or ``--model``."""
    if args.tiny:
        from .tiny import build_tiny

        return build_tiny(args.tiny)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, device_map=args.device_map)
    return model.eval(), AutoProcessor.from_pretrained(args.model)


def prompt_inputs(model, processor, image, question: str):
    from .tiny import chat_prompt

    return processor(images=image, text=chat_prompt(processor, question), return_tensors="pt").to(model.device)


def answer(model, processor, inputs, max_new_tokens: int) -> str:
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def token_views(model, processor, image, inputs, kept, kind: str = "projector") -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(title, RGB image in [0, 1], kept-token mask over its token grid or None) of what the model saw;
    ``kind`` is the method's (LLM-stage indices are placeholder columns: LLaVA-NeXT's are not drawn)."""
    name = type(model).__name__
    if name.startswith("Qwen2_5_VL"):
        _, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
        patch, merge = model.config.vision_config.patch_size, model.config.vision_config.spatial_merge_size
        view = np.asarray(image.convert("RGB").resize((grid_w * patch, grid_h * patch))) / 255.0
        return [("image", view, _mask(kept, grid_h // merge, grid_w // merge))]
    pixels = _denormalize(processor, inputs["pixel_values"][0].float().cpu())
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    if pixels.dim() == 3:  # LLaVA-1.5
        return [("image", pixels.permute(1, 2, 0).numpy(), _mask(kept, side, side))]
    # LLaVA-NeXT: the base patch, then the crops tiled in raster order of the high-resolution grid
    modeling = sys.modules[type(model.model).__module__]
    rows, cols = modeling.get_anyres_image_grid_shape(
        inputs["image_sizes"][0], model.config.image_grid_pinpoints, model.config.vision_config.image_size
    )
    crops = pixels[1 : 1 + rows * cols]
    mosaic = crops.view(rows, cols, *crops.shape[1:]).permute(0, 3, 1, 4, 2).reshape(rows * crops.shape[2], cols * crops.shape[3], 3)
    base = pixels[0].permute(1, 2, 0).numpy()
    if kept is None or kept.dim() != 1 or kind == "llm":  # LLM-stage indices: placeholder columns, not drawn
        return [("base patch", base, None), ("crops", mosaic.numpy(), None)]
    # kept: positions in the model's packed layout; map each to its patch and token (adapters.llava_next)
    layout = adapter_for(model).packed_layout(inputs, [1 + rows * cols])[0]
    source = layout[kept.cpu()]
    base_mask = _mask(source[source < side * side], side, side)
    crop = source[source >= side * side] - side * side
    patch, token = crop // (side * side), crop % (side * side)
    mosaic_mask = np.zeros((rows * side, cols * side), dtype=bool)
    mosaic_mask[((patch // cols) * side + token // side).numpy(), ((patch % cols) * side + token % side).numpy()] = True
    return [("base patch", base, base_mask), ("crops", mosaic.numpy(), mosaic_mask)]


def _denormalize(processor, pixels: torch.Tensor) -> torch.Tensor:
    images = processor.image_processor
    shape = (-1, 1, 1)
    mean, std = torch.tensor(images.image_mean).view(shape), torch.tensor(images.image_std).view(shape)
    return (pixels * std + mean).clamp(0, 1)


def _mask(kept, rows: int, cols: int) -> np.ndarray | None:
    if kept is None:
        return None
    mask = np.zeros(rows * cols, dtype=bool)
    mask[kept.cpu().numpy().ravel()] = True
    return mask.reshape(rows, cols)


def highlight(view: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Dim the patches of pruned tokens."""
    if mask is None:
        return view
    cell = (view.shape[0] // mask.shape[0], view.shape[1] // mask.shape[1])
    scale = np.kron(np.where(mask, 1.0, DIM), np.ones(cell))
    return view[: scale.shape[0], : scale.shape[1]] * scale[..., None]


def draw(panels: list[tuple[str, str, list]], out: str, caption: str) -> None:
    """One column per method, one row per view of the image, ``caption`` above them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(panels[0][2])
    figure, axes = plt.subplots(n_rows, len(panels), figsize=(3.2 * len(panels), 3.4 * n_rows), squeeze=False)
    for column, (method, text, views) in enumerate(panels):
        for row, (title, view, mask) in enumerate(views):
            axis = axes[row, column]
            axis.imshow(highlight(view, mask), interpolation="nearest")
            kept = "" if mask is None else f", {int(mask.sum())}/{mask.size} kept"
            axis.set_title(f"{method} ({title}{kept})\n{text[:40]}", fontsize=8)
            axis.axis("off")
    figure.suptitle(caption, fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo_prune.demo", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="hub id or local path of a LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL checkpoint")
    source.add_argument("--tiny", choices=("llava", "llava_next", "qwen2_5_vl"), help="a tiny random-weight model built locally")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True)
    parser.add_argument("--method", action="append", help="pruning method; repeat for side-by-side panels (default: zoo)")
    parser.add_argument("--keep", type=parse_keep, default=64, help="tokens per image (LLaVA-NeXT: 5-patch budget) or a ratio")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="torch dtype for --model (e.g. bfloat16)")
    parser.add_argument("--device-map", default=None, help="e.g. auto, cuda, cpu (for --model)")
    parser.add_argument("--out", default="demo.png", help="PNG to write")
    args = parser.parse_args(argv)

    from PIL import Image

    methods = args.method or ["zoo"]
    model, processor = load(args)
    try:  # every method checked against this model before any runs
        adapter = adapter_for(model, args.keep)
        for method in methods:
            adapter.check(get_method(method))
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    image = Image.open(args.image).convert("RGB")
    inputs = prompt_inputs(model, processor, image, args.question)
    print(f"unpruned: {answer(model, processor, inputs, args.max_new_tokens)}")
    panels = []
    for method in methods:
        with apply_pruning(model, method, keep=args.keep) as handle:
            text = answer(model, processor, inputs, args.max_new_tokens)
            kept = handle.kept_indices[0]
        print(f"{method}: {text}")
        panels.append((method, text, token_views(model, processor, image, inputs, kept, get_method(method).kind)))
    caption = (f"RANDOM-WEIGHT tiny {args.tiny} model: answers and kept tokens are not meaningful"
               if args.tiny else f"{args.model}, keep={args.keep}")
    draw(panels, args.out, caption)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
