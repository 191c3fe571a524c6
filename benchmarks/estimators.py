"""Sensitivity estimators side by side at the real projector shapes (random weights: no checkpoint).

    python benchmarks/estimators.py                 # all shapes, m = 64 (about 6 minutes on 2 cores)
    python benchmarks/estimators.py --shapes llava15 --repeats 5

For each shape and estimator, one fresh subprocess builds the projector (transformers' own module
class, random weights), precomputes the estimator's per-model state (timed apart), then times
``zo_sensitivity`` on one image's tokens, counts its matmul FLOPs (torch's FlopCounterMode) and
its peak extra resident memory (Linux VmHWM, reset after set-up; CUDA: peak allocated). The
parent prints one table with each estimator's speed-up over ``naive`` measured in the same run
and the Spearman of its ranking against ``naive`` on the same directions; then the greedy
selection's time. Random weights have flat spectra, so ``lowrank``'s Spearman here is a lower
bound, not its quality on a trained projector.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from zoo_prune import ESTIMATORS, GroupedProjector, draw_directions, precompute, select_tokens, zo_sensitivity
from zoo_prune.timing import Session, time_call

# name: (description, tokens per image, keep for the selection timing)
SHAPES = {
    "llava15": ("LLaVA-1.5-7B projector 1024->4096->4096, N=576", 576, 64),
    "llava_next": ("LLaVA-NeXT-7B projector 1024->4096->4096, N=2880 (5 x 576)", 2880, 160),
    "qwen25vl": ("Qwen2.5-VL-7B merger RMSNorm(1280) 5120->5120->3584, N=1024", 1024, 102),
}


def build_projector(shape: str) -> torch.nn.Module:
    """The model family's own projector class at the 7B sizes, randomly initialised."""
    if shape == "qwen25vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

        return GroupedProjector(Qwen2_5_VLPatchMerger(dim=3584, context_dim=1280, spatial_merge_size=2), group=4)
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, num_attention_heads=16),
        text_config=LlamaConfig(hidden_size=4096, num_attention_heads=32),
    )
    return LlavaMultiModalProjector(config)


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_memory_mib(device: torch.device, baseline: int) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = int(next(line for line in status if line.startswith("VmHWM")).split()[1])
    return (peak_kib * 1024 - baseline) / 2**20


def current_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) * 1024


def run_cell(shape: str, estimator: str, m: int, repeats: int, device: str, save: str) -> dict:
    """One estimator on one shape, in this (fresh) process."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(device)
    torch.manual_seed(0)
    projector = build_projector(shape).to(device).eval()
    d_v = projector.merger.hidden_size if shape == "qwen25vl" else projector.linear_1.in_features
    features = torch.randn(SHAPES[shape][1], d_v, generator=torch.Generator().manual_seed(1)).to(device)
    directions = draw_directions(m, d_v, seed=0)
    run = lambda x: zo_sensitivity(projector, x, directions=directions, estimator=estimator)  # noqa: E731
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    baseline = current_memory(device)
    peak_memory_reset(device)
    try:
        start = time.perf_counter()
        precompute(projector, estimator, device=device)
        sync()
        precompute_s = time.perf_counter() - start
    except TypeError as error:  # not a Linear-act-Linear projector
        return {"shape": shape, "estimator": estimator, "unsupported": str(error).split(";")[0]}
    run(features[:4])  # warm-up
    timing = time_call(lambda: run(features), repeats=repeats, warmup=0, device=device, max_seconds=5.0)
    sensitivity = run(features)
    peak = peak_memory_mib(device, baseline)
    with FlopCounterMode(display=False) as counter:
        run(features)
    torch.save(sensitivity.cpu(), save)
    return {
        "shape": shape, "estimator": estimator, "tokens": features.shape[0], "m": m,
        "precompute_s": precompute_s, "seconds": timing.median, "min_s": timing.minimum, "max_s": timing.maximum,
        "runs": len(timing.seconds),
        "gflops": counter.get_total_flops() / 1e9, "peak_extra_mib": peak,
    }


def time_selection(shape: str, k: int, repeats: int, device: str) -> dict:
    """Greedy selection on projected tokens of the shape's size (sensitivity and Z random)."""
    n = SHAPES[shape][1]
    d_l = 3584 if shape == "qwen25vl" else 4096
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(n, d_l, generator=generator).to(device)
    s = torch.rand(n, generator=generator).to(device)
    row = {"shape": shape, "tokens": n, "k": k}
    for fusion in ("multiply", "diversity"):
        timing = time_call(lambda: select_tokens(z, k, sensitivity=s, fusion=fusion), repeats=repeats, device=device)
        row[fusion + "_ms"] = 1e3 * timing.median
    return row


def format_tables(cells: list[dict], selections: list[dict], m: int, machine: str) -> str:
    lines = [
        f"Sensitivity per image, m = {m}, random weights (timings and FLOPs representative; Spearman of "
        "`lowrank` is not: random weights have flat spectra). Machine: " + machine + ".",
        "",
        "| shape | estimator | time / image | speed-up vs naive | FLOPs (matmul) | FLOP ratio | one-off precompute "
        "| peak extra memory | Spearman vs naive |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        if "unsupported" in cell:
            lines.append(f"| {cell['shape']} | {cell['estimator']} | n/a: not Linear-act-Linear | | | | | | |")
            continue
        naive = next(c for c in cells if c["shape"] == cell["shape"] and c["estimator"] == "naive")
        lines.append(
            f"| {cell['shape']} | {cell['estimator']} | {cell['seconds']:.3f} s | {naive['seconds'] / cell['seconds']:.1f}x "
            f"| {cell['gflops']:.0f} G | {naive['gflops'] / max(cell['gflops'], 1e-9):.1f}x | {cell['precompute_s']:.2f} s "
            f"| {cell['peak_extra_mib']:.0f} MiB | {cell['spearman']:.4f} |"
        )
    lines += ["", "Greedy selection per image (selection only, projected tokens given):", "",
              "| shape | N | k | ZOO-Prune (multiply) | DivPrune (diversity) |", "|---|---:|---:|---:|---:|"]
    for row in selections:
        lines.append(f"| {row['shape']} | {row['tokens']} | {row['k']} | {row['multiply_ms']:.1f} ms | {row['diversity_ms']:.1f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (fewer when a run takes > 5 s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/estimators.json")
    parser.add_argument("--cell", nargs=2, metavar=("SHAPE", "ESTIMATOR"), help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(*args.cell, args.m, args.repeats, args.device, args.save)))
        return
    if "naive" not in args.estimators:
        parser.error("--estimators must include naive: every ratio is measured against it")

    # Other processes on the machine distort every timing: say how loaded it was (zoo_prune.timing).
    session = Session().__enter__()
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(shape, est) for shape in args.shapes for est in ["naive"] + [e for e in args.estimators if e != "naive"]]
        for shape, estimator in tqdm(jobs, desc="estimator cells", unit="cell"):
            save = f"{tmp}/{shape}-{estimator}.pt"
            command = [sys.executable, __file__, "--cell", shape, estimator, "--m", str(args.m),
                       "--repeats", str(args.repeats), "--device", args.device, "--save", save]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"cell {shape}/{estimator} failed:\n{done.stderr}")
            cell = json.loads(done.stdout.strip().splitlines()[-1])
            if "unsupported" not in cell:
                naive = torch.load(f"{tmp}/{shape}-naive.pt")
                cell["spearman"] = float(spearmanr(torch.load(save).numpy(), naive.numpy()).statistic)
            cells.append(cell)
    selections = [time_selection(shape, SHAPES[shape][2], args.repeats, args.device) for shape in args.shapes]
    session.__exit__(None, None, None)
    machine = f"{args.device}, {session.describe()}"
    table = format_tables(cells, selections, args.m, machine)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "conditions": session.conditions(), "m": args.m,
                               "cells": cells, "selection": selections}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
