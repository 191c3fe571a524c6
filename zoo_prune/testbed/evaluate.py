"""Accuracy (F1 for existence) of a testbed VLM per task on a split, optionally under ``apply_pruning``.

    python -m zoo_prune.testbed.evaluate --model models/testbed-llava --data data/testbed --split test \\
        --method random --keep 64

Evaluation as lmms-eval does it: the processor's chat template with one image and the question,
greedy generation of a few tokens, the answer lower-cased and stripped, compared to the ground truth.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ..tiny import chat_prompt
from .dataset import load_split
from .questions import FAMILIES, METRICS


def normalise(text: str) -> str:
    text = text.strip().lower()
    return text.split()[0].strip(".,?!") if text.split() else ""


def score(family: str, predictions: list[str], answers: list[str]) -> float:
    """Accuracy, or for existence (METRICS) the F1 of "yes"; both in [0, 1]."""
    if METRICS[family] == "f1":
        tp = sum(p == a == "yes" for p, a in zip(predictions, answers))
        predicted, actual = sum(p == "yes" for p in predictions), sum(a == "yes" for a in answers)
        return 2 * tp / (predicted + actual) if predicted + actual else 1.0
    return sum(p == a for p, a in zip(predictions, answers)) / max(len(answers), 1)


@torch.no_grad()
def answer(model, processor, images, questions: list[str], max_new_tokens: int = 3) -> list[str]:
    """Greedy answers of a batch of (image, question), normalised."""
    prompts = [chat_prompt(processor, q) for q in questions]
    inputs = processor(images=list(images), text=prompts, padding=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [normalise(t) for t in texts]


def evaluate(model, processor, data_dir, split: str = "validation", families=FAMILIES, limit: int | None = None,
             method: str | None = None, keep: int | float | None = None, batch_size: int = 25,
             progress: bool = False, **options) -> dict:
    """{family: score, ..., "average": mean} on ``split``; pruned with ``method`` / ``keep`` if given."""
    from ..pruned_model import apply_pruning

    was_training = model.training
    model.eval()
    results = {}
    pruning = apply_pruning(model, method=method, keep=keep, **options) if method else nullcontext()
    try:
        with pruning:
            for family in families:
                rows = load_split(data_dir, f"tasks/{family}", split, limit)
                predictions = []
                for start in tqdm(range(0, len(rows), batch_size), desc=f"{family} {method or 'unpruned'}",
                                  disable=not progress, leave=False):
                    batch = rows[start:start + batch_size]
                    predictions += answer(model, processor, batch["image"], batch["question"])
                results[family] = score(family, predictions, list(rows["answer"]))
    finally:
        model.train(was_training)
    results["average"] = sum(results[f] for f in families) / len(families)
    return results


def main(argv=None) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/testbed-llava")
    parser.add_argument("--data", default="data/testbed")
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--limit", type=int, help="questions per task")
    parser.add_argument("--method", nargs="*", default=[None], help="pruning methods ('none' = unpruned)")
    parser.add_argument("--keep", nargs="*", type=int, default=[64])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    for method in args.method:
        method = None if method in (None, "none") else method
        for keep in args.keep if method else [None]:
            result = evaluate(model, processor, args.data, args.split, limit=args.limit, method=method, keep=keep)
            print(json.dumps({"method": method or "unpruned", "keep": keep,
                              **{k: round(100 * v, 1) for k, v in result.items()}}), flush=True)


if __name__ == "__main__":
    main()
