"""benchmarks/gpu_hours.py: the weights and KV cache it streams, against LLaVA-1.5-7B's architecture counted by
hand, and its roofline on a hand-worked document."""

import sys

import pytest
from pipeline_helpers import ROOT

from zoo_prune.evaluation import PAPER_TASKS

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_hours  # noqa: E402


def test_llava_7b_streams_its_decoder_and_lm_head_and_a_kv_cache_of_its_width():
    model = gpu_hours.Model("llava-1.5-7b", "float16")
    # Llama-2-7B widths of llava-hf/llava-1.5-7b-hf: 32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32064
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # q k v o, gate up down, two RMSNorms
    decoder = 32 * layer + 4096 + 32064 * 4096  # + final norm + lm_head (the embedding table is looked up, not read)
    assert model.language_weights == 2 * decoder
    assert model.kv_per_token_layer == 2 * 32 * 128 * 2  # K and V, 32 heads of 128, 2 bytes
    assert model.weights > model.language_weights  # + the CLIP tower and the projector, read once per prefill


def test_a_document_takes_the_slower_of_compute_and_weights_then_its_decode():
    a = gpu_hours.Assumptions(mfu=0.5, bandwidth_efficiency=0.5, answer_tokens=2)
    a100 = gpu_hours.GPUS["A100-80GB"]
    # 2 s of fp16 work + 1 s of fp32 work (weights read in far less), then 3 s of decode reads
    compute_bound = gpu_hours.document_work(a100.fp16 * 0.5 * 2.0, a100.fp32 * 0.5 * 1.0, 1e9,
                                            a100.bandwidth * 0.5 * 3, a)
    assert compute_bound.seconds["A100-80GB"] == pytest.approx(2.0 + 1.0 + 3.0)
    memory_bound = gpu_hours.document_work(1.0, 0.0, a100.bandwidth * 0.5 * 4, 0.0, a)
    assert memory_bound.seconds["A100-80GB"] == pytest.approx(4.0)
    both = (compute_bound + memory_bound) * 10
    assert both.documents == 20 and both.hours("A100-80GB") == pytest.approx(10 * 10.0 / 3600)


def test_task_sizes_are_those_their_sources_state():
    seed, _ = gpu_hours.TASKS["seedbench"]
    assert sum(n for n, _ in seed) == 17990 and dict((i, n) for n, i in seed) == {1: 14233, 8: 3757}
    assert {t for t in gpu_hours.TASKS} >= set(PAPER_TASKS)
