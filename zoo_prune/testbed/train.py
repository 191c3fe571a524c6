"""Train the testbed VLM on CPU in stages, the way LLaVA is made, and save model + processor in one folder.

    python -m zoo_prune.testbed.train --data data/testbed --out models/testbed-llava [--seed 0]

* Stage A, the vision tower alone: dense per-patch targets the generator knows, from linear heads
  on the tower's last layer (the one the projector reads): the colour, shape, joint colour x
  shape and glyph of the object covering the patch, whether the patch is its object's first
  (raster order: counting), and the patch's row and column (relations). The tower thereby keeps
  each token about its own patch, so dropping tokens drops information.
* Stage B (optional, ``--b-steps N``; off by default: within the CPU budget it plateaued at the
  answer prior and left stage D worse off, see the model card), the language model on *ground-truth* visual tokens (the analogue of LLaVA starting
  from a trained LLM): each patch's token is the sum of the LM's own word embeddings of its
  colour, shape and digit plus learned row / column / first-patch embeddings (:class:`TruthTokens`).
  Training conversation: one per image, all of its questions in a seeded random order; the first
  turn is exactly the evaluation prompt of the processor's chat template, each answer is one word
  + EOS, and the loss is on the answers and EOS only.
* Stage C (with B), the projector alone (LLaVA's feature alignment): regress the ground-truth tokens from
  the frozen tower's features (relative MSE).
* Stage D, projector + language model on the same conversations with the tower's features
  (tower frozen; its features are computed once), after a curriculum: object-patch tokens only first, then the
  background tokens back at a rising rate (``d_objects_only``, ``d_ramp``).

Deterministic under ``--seed`` (seeded weights and data order, deterministic algorithms) for a
fixed thread count (``--threads``; floating-point reductions depend on it).
Writes ``training_log.json`` and ``loss_curve.png`` next to the model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..tiny import chat_prompt
from .dataset import load_split
from .model import TestbedConfig, build_model
from .scenes import COLOURS, PATCH_COLOURS, PATCH_GLYPHS, PATCH_SHAPES, SceneObject, patch_labels


@dataclass
class TrainConfig:
    """Steps, batch sizes and learning rates of both stages (defaults: the committed model)."""

    seed: int = 0
    train_images: int | None = None  # None = the whole train split
    a_steps: int = 3000
    a_batch: int = 32
    a_lr: float = 2e-3
    a_glyph_boxes_only: bool = True  # digit loss on glyph-box patches only (False: every patch, 95% "none": digits never learned)
    b_steps: int = 0  # LM on ground-truth visual tokens (0: skip B and C; measured worse, see the model card)
    b_batch: int = 16  # conversations per step in B and D
    b_lr: float = 5e-4
    c_steps: int = 300  # projector alignment
    c_batch: int = 64
    c_lr: float = 2e-3
    d_steps: int = 4800  # projector + LM on the tower's features
    d_lr: float = 5e-4  # 2e-3 and above leave the LM at the answer prior (measured; see the model card)
    d_objects_only: float = 0.25  # fraction of B/D steps that show the LM only the object patches' tokens ...
    d_ramp: float = 0.25  # ... then this fraction adding the background tokens back, at a linearly rising rate
    b_max_turns: int = 12
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of each stage's steps
    eval_limit: int = 100  # validation questions per task for the evaluation after training
    model: TestbedConfig = field(default_factory=TestbedConfig)


# ---------------------------------------------------------------- data


def pixel_values(processor, images, chunk: int = 256) -> torch.Tensor:
    """(N, 3, S, S) float32 pixels of PIL ``images`` through the processor's image processor."""
    out = [processor.image_processor(list(images[i:i + chunk]), return_tensors="pt")["pixel_values"]
           for i in range(0, len(images), chunk)]
    return torch.cat(out)


def joint_index(colour: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """0 for background, else 1 + (colour - 1) * shapes + (shape - 1): one class per colour x shape (boxes too)."""
    n_shapes = len(PATCH_SHAPES) - 1
    return np.where(colour > 0, 1 + (colour - 1) * n_shapes + (shape - 1), 0)


def patch_targets(rows, patch_size: int) -> dict[str, torch.Tensor]:
    """Stage A's per-patch targets of scene rows at ``patch_size`` (from each object map), each (N, patches) int64."""
    labels = [patch_labels(np.asarray(r["object_map"]), [SceneObject.from_dict(o) for o in r["objects"]], patch_size)
              for r in rows]
    obj, colour, shape, glyph = (np.stack([x[k] for x in labels]).astype(np.int64) for k in ("object", "colour", "shape", "glyph"))
    grid = int(round(math.sqrt(obj.shape[1])))
    first = np.zeros_like(obj)
    for i, ids in enumerate(obj):
        values, index = np.unique(ids, return_index=True)
        first[i, index[values > 0]] = 1
    n = obj.shape[0]
    position = np.arange(grid * grid)
    targets = {"colour": colour, "shape": shape, "joint": joint_index(colour, shape),
               "glyph": glyph, "first": first,
               "row": np.broadcast_to(position // grid, (n, grid * grid)),
               "column": np.broadcast_to(position % grid, (n, grid * grid))}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in targets.items()}


def head_sizes(grid: int) -> dict[str, int]:
    return {"colour": len(PATCH_COLOURS), "shape": len(PATCH_SHAPES), "joint": 1 + len(COLOURS) * (len(PATCH_SHAPES) - 1),
            "glyph": len(PATCH_GLYPHS), "first": 2, "row": grid, "column": grid}


def conversation(tokenizer, image_ids: list[int], questions: list[dict]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one image's questions as a multi-turn chat; labels -100 except answers + EOS.

    Turn 1 is ``chat_prompt`` (image + question, generation prompt) with the image placeholder
    expanded to ``image_ids``; later turns are "USER: <question> ASSISTANT:" as the template writes them.
    """
    ids, labels = [], []
    for turn, qa in enumerate(questions):
        text = f"USER: <image>\n{qa['question']} ASSISTANT:" if turn == 0 else f"USER: {qa['question']} ASSISTANT:"
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        if turn == 0:
            at = prompt.index(image_ids[0])
            prompt = prompt[:at] + image_ids + prompt[at + 1:]
        answer = tokenizer(qa["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
    return ids, labels


def lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Linear warmup, then cosine decay to 10%."""
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


# ---------------------------------------------------------------- stages


def tower_states(model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, N, D) patch tokens of the layer the projector reads (CLS dropped)."""
    tower = model.model.vision_tower
    out = tower(pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def stage_a(model, pixels, targets, cfg: TrainConfig, log: list, generator: torch.Generator,
            progress: bool = True) -> dict:
    """Train the vision tower with per-patch linear heads; returns the heads' final training accuracies."""
    grid = cfg.model.image_size // cfg.model.patch_size
    heads = nn.ModuleDict({k: nn.Linear(cfg.model.vision_width, n) for k, n in head_sizes(grid).items()})
    tower = model.model.vision_tower
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.a_lr, weight_decay=cfg.weight_decay)
    tower.train()
    n = pixels.shape[0]
    order = torch.randperm(n, generator=generator)
    accuracy = {}
    bar = tqdm(range(cfg.a_steps), desc="stage A (tower)", unit="step", disable=not progress)
    for step in bar:
        start = (step * cfg.a_batch) % n
        if start + cfg.a_batch > n:
            order = torch.randperm(n, generator=generator)
        index = order[start:start + cfg.a_batch] if start + cfg.a_batch <= n else order[:cfg.a_batch]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.a_steps, cfg.a_lr, cfg.warmup)
        states = tower_states(model, pixels[index])
        losses = {}
        for name, head in heads.items():
            logits = head(states)
            target = targets[name][index]
            if name == "glyph" and cfg.a_glyph_boxes_only:
                target = target.masked_fill(target == 0, -100)  # ignored by cross_entropy
            losses[name] = F.cross_entropy(logits.flatten(0, 1), target.flatten())
            if step >= cfg.a_steps - 20:  # mean over the last 20 steps, on object patches for object labels
                mask = target >= 0  # not ignored
                if name in ("colour", "shape", "joint", "glyph"):
                    mask &= targets["colour"][index] > 0
                hit = (logits.argmax(-1) == target)[mask].float().mean().item()
                accuracy[name] = accuracy.get(name, 0.0) + hit / 20
        loss = sum(losses.values()) / len(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        log.append({"stage": "A", "step": step, "loss": loss.item()})
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return accuracy


@torch.no_grad()
def tower_features(model, pixels: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    model.model.vision_tower.eval()
    return torch.cat([tower_states(model, pixels[i:i + chunk]) for i in range(0, len(pixels), chunk)])


def lm_loss(model, visual: list[torch.Tensor], batch: list[tuple[list[int], list[int]]], pad_id: int,
            image_token_id: int) -> torch.Tensor:
    """Cross-entropy on the answers of ``batch`` (right-padded); conversation i's image placeholders
    are replaced by ``visual[i]`` (n_i, W), n_i = its number of placeholders."""
    length = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), length), pad_id)
    labels = torch.full((len(batch), length), -100)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    embeds = model.get_input_embeddings()(ids)
    image = ids == image_token_id
    embeds = embeds.masked_scatter(image[..., None], torch.cat(visual).to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits, targets[keep])


def background_rate(step: int, steps: int, objects_only: float, ramp: float) -> float:
    """Curriculum: the fraction of background tokens shown at ``step`` (0 for the first
    ``objects_only`` of the steps, then rising linearly to 1 over the next ``ramp``)."""
    start, length = objects_only * steps, ramp * steps
    if step < start:
        return 0.0
    return 1.0 if step >= start + length else (step - start) / length


def curriculum_tokens(objects: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor | None:
    """Token indices (raster order) of one image: every object patch and each background patch with
    probability ``rate``; None (all tokens) at rate 1. ``objects``: (N,) bool, object patches."""
    if rate >= 1.0:
        return None
    shown = objects | (torch.rand(objects.shape, generator=generator) < rate)
    return shown.nonzero().flatten() if bool(shown.any()) else None


class TruthTokens(nn.Module):
    """Ground-truth visual tokens for the LM's warm-up (stage B), the analogue of starting LLaVA from a trained LLM.

    A patch's token is the sum of the LM's own input embeddings of its colour, shape and digit words
    (a learned "none" vector for background) and learned row, column and first-patch embeddings.
    Stage C then teaches the projector to map the tower's features onto these tokens.
    """

    def __init__(self, model, tokenizer, grid: int):
        super().__init__()
        width = model.config.text_config.hidden_size
        self.embed = model.get_input_embeddings()
        for name, vocabulary in (("colour", PATCH_COLOURS), ("shape", PATCH_SHAPES), ("glyph", PATCH_GLYPHS)):
            words = [tokenizer.convert_tokens_to_ids(w) if i else 0 for i, w in enumerate(vocabulary)]
            self.register_buffer(f"{name}_words", torch.tensor(words), persistent=False)
        self.none = nn.Parameter(torch.zeros(3, width))
        self.row, self.column, self.first = nn.Embedding(grid, width), nn.Embedding(grid, width), nn.Embedding(2, width)
        for table in (self.row, self.column, self.first):
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.row(targets["row"]) + self.column(targets["column"]) + self.first(targets["first"])
        for k, name in enumerate(("colour", "shape", "glyph")):
            label = targets[name]
            words = self.embed(getattr(self, f"{name}_words")[label])
            out = out + torch.where(label[..., None] > 0, words, self.none[k])
        return out


def qa_stage(name: str, model, processor, visual, questions, params, steps: int, lr: float, cfg: TrainConfig,
             log: list, generator: torch.Generator, progress: bool = True, objects: torch.Tensor | None = None) -> None:
    """Train ``params`` on multi-turn question conversations; ``visual(index)`` gives the (B, N, W) visual tokens.

    With ``objects`` ((images, N) bool, the object patches), the first steps follow the curriculum of
    :func:`background_rate` (LLaVA has no such step: it starts from a trained LLM; here the content
    look-up "question word -> matching visual token" forms much sooner among ~20 object tokens than among 144).
    """
    tokenizer = processor.tokenizer
    image_id = model.config.image_token_id
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    model.train()
    n = len(questions)
    order, cursor = torch.randperm(n, generator=generator), 0
    bar = tqdm(range(steps), desc=f"stage {name}", unit="step", disable=not progress)
    for step in bar:
        if cursor + cfg.b_batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor:cursor + cfg.b_batch]
        cursor += cfg.b_batch
        rate = 1.0 if objects is None else background_rate(step, steps, cfg.d_objects_only, cfg.d_ramp)
        tokens, batch = [], []
        for row, i in zip(visual(index), index.tolist()):
            shown = None if objects is None else curriculum_tokens(objects[i], rate, generator)
            tokens.append(row if shown is None else row[shown])
            qs = questions[i]
            perm = torch.randperm(len(qs), generator=generator).tolist()[:cfg.b_max_turns]
            batch.append(conversation(tokenizer, [image_id] * len(tokens[-1]), [qs[j] for j in perm]))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg.warmup)
        loss = lm_loss(model, tokens, batch, tokenizer.pad_token_id, image_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        log.append({"stage": name[0], "step": step, "loss": loss.item(), "background": rate})
        bar.set_postfix(loss=f"{loss.item():.3f}", background=f"{rate:.2f}")
    model.eval()


def align_stage(model, features, truth, targets, cfg: TrainConfig, log: list, generator: torch.Generator,
                progress: bool = True) -> None:
    """Stage C: the projector regresses the ground-truth tokens from the frozen tower's features (MSE)."""
    projector = model.model.multi_modal_projector
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.c_lr, weight_decay=cfg.weight_decay)
    n = features.shape[0]
    bar = tqdm(range(cfg.c_steps), desc="stage C (projector alignment)", unit="step", disable=not progress)
    for step in bar:
        index = torch.randint(0, n, (cfg.c_batch,), generator=generator)
        with torch.no_grad():
            goal = truth({k: v[index] for k, v in targets.items()})
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.c_steps, cfg.c_lr, cfg.warmup)
        loss = F.mse_loss(projector(features[index]), goal) / goal.pow(2).mean()  # relative error
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.append({"stage": "C", "step": step, "loss": loss.item()})
        bar.set_postfix(loss=f"{loss.item():.3f}")


# ---------------------------------------------------------------- driver


def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train(data_dir, cfg: TrainConfig, *, progress: bool = True):
    """(model, processor, log dict) after both stages on ``data_dir``'s train split."""
    set_determinism(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model, processor = build_model(cfg.model, seed=cfg.seed)
    rows = load_split(data_dir, "scenes", "train", cfg.train_images)
    size = rows[0]["image"].size[0]
    if size != cfg.model.image_size:
        raise ValueError(f"the data's images are {size} px but the model's image_size is {cfg.model.image_size}")
    times, log = {}, []
    t0 = time.perf_counter()
    pixels = pixel_values(processor, rows["image"])
    targets = patch_targets(rows, cfg.model.patch_size)
    questions = list(rows["questions"])
    objects = targets["colour"] > 0  # patches covered by an object (boxes included)
    times["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    patch_accuracy = stage_a(model, pixels, targets, cfg, log, generator, progress)
    times["stage_a_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    features = tower_features(model, pixels)
    tower = set(model.model.vision_tower.parameters())
    for p in tower:
        p.requires_grad_(False)
    lm = list({id(p): p for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]}.values())
    if cfg.b_steps:
        truth = TruthTokens(model, processor.tokenizer, cfg.model.image_size // cfg.model.patch_size)
        params = lm + [p for name, p in truth.named_parameters() if not name.startswith("embed.")]
        qa_stage("B (LM on ground-truth tokens)", model, processor,
                 lambda index: truth({k: v[index] for k, v in targets.items()}), questions, params,
                 cfg.b_steps, cfg.b_lr, cfg, log, generator, progress, objects)
        times["stage_b_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        align_stage(model, features, truth.eval(), targets, cfg, log, generator, progress)
        times["stage_c_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    projector = model.model.multi_modal_projector
    qa_stage("D (projector + LM on tower features)", model, processor, lambda index: projector(features[index]),
             questions, lm + list(projector.parameters()), cfg.d_steps, cfg.d_lr, cfg, log, generator, progress, objects)
    times["stage_d_s"] = time.perf_counter() - t0
    for p in tower:
        p.requires_grad_(True)
    times["total_s"] = sum(times.values())
    info = {"config": asdict(cfg), "times": times, "stage_a_patch_accuracy": patch_accuracy,
            "images": len(rows), "log": log}
    return model.eval(), processor, info


def plot_loss(log: list, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"A": "A: tower, per-patch targets", "B": "B: LM on ground-truth tokens",
              "C": "C: projector alignment (rel. MSE)", "D": "D: projector + LM on tower features"}
    stages = list(dict.fromkeys(r["stage"] for r in log)) or ["A"]
    fig, axes = plt.subplots(1, len(stages), figsize=(3.4 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        steps, losses = zip(*[(r["step"], r["loss"]) for r in log if r["stage"] == stage]) if log else ((0,), (1.0,))
        ax.plot(steps, losses, lw=0.5, alpha=0.4)
        k = max(1, len(losses) // 50)
        ax.plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, mode="valid"), lw=1.5)
        ax.set(title=titles.get(stage, stage), xlabel="step", ylabel="loss", yscale="log")
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CLI_FIELDS = ("train_images", "a_steps", "a_batch", "a_lr", "b_steps", "b_batch", "b_lr", "c_steps", "c_lr", "d_steps",
              "d_lr", "d_objects_only", "d_ramp", "eval_limit")  # TrainConfig numbers that are --flags
MODEL_CLI_FIELDS = ("vision_width", "vision_layers", "text_width", "text_layers")  # TestbedConfig sizes that are --flags


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/testbed")
    parser.add_argument("--out", default="models/testbed-llava")
    parser.add_argument("--seed", type=int, default=0)
    defaults = TrainConfig()
    for name in CLI_FIELDS:
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value) if value is not None else int, default=value)
    parser.add_argument("--a-glyph-boxes-only", type=lambda v: v.lower() in ("1", "true", "yes"), default=defaults.a_glyph_boxes_only,
                        help="true: stage A's digit loss on glyph-box patches only")
    for name in MODEL_CLI_FIELDS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults.model, name))
    parser.add_argument("--threads", type=int, help="torch threads (1 avoids thrashing on a shared 2-core machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg = TestbedConfig(**{k: getattr(args, k) for k in MODEL_CLI_FIELDS})
    cfg = TrainConfig(seed=args.seed, model=model_cfg,
                      **{k: getattr(args, k) for k in (*CLI_FIELDS, "a_glyph_boxes_only")})
    model, processor, info = train(args.data, cfg)

    from .evaluate import evaluate

    t0 = time.perf_counter()
    info["validation"] = evaluate(model, processor, args.data, "validation", limit=cfg.eval_limit, progress=True)
    info["times"]["evaluation_s"] = time.perf_counter() - t0
    print("validation:", {k: round(100 * v, 1) for k, v in info["validation"].items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(info, indent=1) + "\n")
    plot_loss(info["log"], out / "loss_curve.png")
    print(f"saved {out} (training {info['times']['total_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
