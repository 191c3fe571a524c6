"""The FLOPs ledger against counts written from the layer shapes, and the timing helper on a fake clock."""

import socket

import pytest
import torch
import transformers as tf

from zoo_prune import available_methods, get_method
from zoo_prune import timing
from zoo_prune.flops import PARTS, Ledger, meta_model, paper_models, paper_spec

# A small LLaVA: CLIP tower 32 px / patch 8 -> N = 16 tokens, width 16, MLP 40, 2 layers;
# projector 16 -> 24 -> 24; Llama width 24, 4 heads, gated MLP 56, 3 layers.
VISION = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=2, projection_dim=16)
TEXT = dict(hidden_size=24, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=64)


def tiny_config():
    return tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**VISION), text_config=tf.LlamaConfig(**TEXT),
                          image_token_index=63, image_seq_length=16, vision_feature_layer=-2)


def mm(m, k, n):
    """FLOPs of an (m, k) @ (k, n) product: 2 per multiply-add."""
    return 2 * m * k * n


def clip_by_hand(v) -> int:
    n = (v["image_size"] // v["patch_size"]) ** 2
    t, d, f = n + 1, v["hidden_size"], v["intermediate_size"]
    patch_embedding = mm(n, 3 * v["patch_size"] ** 2, d)  # the stride-p convolution
    layer = 4 * mm(t, d, d) + 2 * mm(t, d, t) + mm(t, d, f) + mm(t, f, d)  # q k v o, QK^T and AV, MLP
    return patch_embedding + v["num_hidden_layers"] * layer


def llama_layer_by_hand(n, t) -> int:
    d, f = t["hidden_size"], t["intermediate_size"]
    return 4 * mm(n, d, d) + 2 * mm(n, d, n) + 3 * mm(n, d, f)  # q k v o, QK^T and AV, gate up down


@pytest.fixture(scope="module")
def ledger():
    return Ledger(meta_model(tiny_config()), "tiny")


def test_ledger_counts_a_small_llava_as_the_layer_shapes_say(ledger):
    text, keep, n = 7, 5, 16
    parts = ledger.parts(None, None, text_tokens=text)
    assert parts["vision"] == clip_by_hand(VISION)
    assert parts["projector"] == mm(n, 16, 24) + mm(n, 24, 24)
    assert parts["llm"] == TEXT["num_hidden_layers"] * llama_layer_by_hand(n + text, TEXT)
    assert parts["sensitivity"] == parts["selection"] == 0

    divprune = ledger.parts(get_method("divprune"), keep, text_tokens=text)
    assert divprune["llm"] == 3 * llama_layer_by_hand(keep + text, TEXT)
    assert divprune["projector"] == parts["projector"] and divprune["vision"] == parts["vision"]
    assert divprune["selection"] > 0  # cosine products of the greedy selection

    fastv = ledger.parts(get_method("fastv", layer=2), keep, text_tokens=text)  # layers 0, 1 see every token
    assert fastv["llm"] == 2 * llama_layer_by_hand(n + text, TEXT) + llama_layer_by_hand(keep + text, TEXT)

    visionzip = ledger.parts(get_method("visionzip"), keep, text_tokens=text)
    assert visionzip["projector"] == mm(keep, 16, 24) + mm(keep, 24, 24)  # the projector sees only k tokens


def test_sensitivity_counts_follow_the_estimators_shapes(ledger):
    n, m, d_v, d_h, d_l = 16, 64, 16, 24, 24
    zoo = get_method("zoo", m=m)
    naive = mm(2 * n * m + 1, d_v, d_h) + mm(2 * n * m + 1, d_h, d_l)  # 2Nm perturbed tokens and one probe
    fused = mm(n, d_v, d_h) + mm(m, d_v, d_h) + mm(n * m, d_h, d_l)  # a = W1 X, v = W1 U, W2 on the differences
    closed_form = mm(n, d_v, d_h) + mm(n, d_h, d_h)  # a = W1 X, then g^T K per token
    for estimator, expected in [("naive", naive), ("fused", fused), ("closed_form", closed_form)]:
        assert ledger.parts(zoo, 4, text_tokens=1, estimator=estimator)["sensitivity"] == expected, estimator


def test_rows_cover_every_registered_method_and_part(ledger):
    rows = ledger.rows([8, 4], text_tokens=3)
    assert set(rows[0]) == {"model", "method", "keep", "text_tokens", "part", "flops"}
    methods = {row["method"].split(":")[0] for row in rows}
    assert methods == set(available_methods()) | {"unpruned"}
    assert {row["part"] for row in rows} == set(PARTS)
    estimators = {row["method"].split(":")[1] for row in rows if row["method"].startswith("zoo:")}
    assert estimators == {"naive", "fused", "lowrank", "closed_form"}


def test_paper_models_build_on_meta_without_weights_or_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the ledger tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert paper_models() == ["llava-1.5-13b", "llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b"]
    assert paper_spec("llava-next-7b")["hub_id"] == "llava-hf/llava-v1.6-vicuna-7b-hf"
    ledger = Ledger.paper("llava-1.5-7b")
    assert {p.device.type for p in ledger.model.parameters()} == {"meta"}
    # LLaMA-7B's decoder at 576 + 60 tokens, from the shapes: 8.45 TFLOPs
    text = dict(hidden_size=4096, intermediate_size=11008)
    assert ledger.llm([636] * 32) == 32 * llama_layer_by_hand(636, text)
    assert ledger.vision == clip_by_hand(dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                               num_hidden_layers=24))
    with pytest.raises(ValueError, match="no model configuration named 'llava-2'"):
        paper_spec("llava-2")


class FakeClock:
    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def tick(self):
        self.now += self.durations.pop(0)

    def __call__(self):
        return self.now


def test_time_call_statistics_on_a_fake_clock():
    clock = FakeClock([0.0, 3.0, 1.0, 2.0, 10.0])
    calls = []

    def work():
        calls.append(1)
        clock.tick()

    result = timing.time_call(work, repeats=4, warmup=1, clock=clock)
    assert len(calls) == 5  # the warm-up is called but not timed
    assert result.seconds == [3.0, 1.0, 2.0, 10.0]
    assert (result.median, result.minimum, result.maximum) == (2.5, 1.0, 10.0)
    assert result.spread == pytest.approx(9.0 / 2.5) and result.unsteady
    short = timing.time_call(lambda: clock.tick(), repeats=5, warmup=0, max_seconds=3.0,
                             clock=(clock := FakeClock([2.0, 2.0, 2.0, 2.0, 2.0])))
    assert short.seconds == [2.0, 2.0] and not short.unsteady  # stops once 3 s are spent
    jitter = timing.Timing([0.001, 0.0025])  # 150 % spread, but 1.5 ms: not flagged
    assert jitter.spread > timing.MAX_SPREAD and not jitter.unsteady
    with pytest.raises(ValueError, match="repeats=0"):
        timing.time_call(lambda: None, repeats=0)


def test_session_pins_threads_and_flags_a_loaded_machine(monkeypatch):
    loads = iter([0.2, 2.4])
    monkeypatch.setattr(timing, "load_average", lambda: next(loads))
    monkeypatch.setattr(timing, "cores", lambda: 2)
    before = torch.get_num_threads()
    with timing.Session(threads=1) as session:
        assert torch.get_num_threads() == 1
        session.time(lambda: None, name="noop", repeats=2)
    assert torch.get_num_threads() == before
    c = session.conditions()
    assert c["torch_threads"] == 1 and c["load_average_1min_before"] == 0.2 and c["load_average_1min_after"] == 2.4
    assert c["loaded"] and c["flagged"]  # 2.4 - own 1 thread = 1.4 > 0.5 x 2 cores
    assert "FLAGGED" in session.describe()

    loads = iter([0.1, 1.3])
    with timing.Session(threads=1) as quiet:
        pass
    assert not quiet.conditions()["flagged"]  # 1.3 - 1 = 0.3 <= 1.0

    # the previous stage's load still in the 1-minute average: settle waits for it to decay below the limit
    loads = iter([1.5, 1.2, 0.8, 0.8, 1.1])
    monkeypatch.setattr(timing.time, "sleep", lambda seconds: None)
    with timing.Session(threads=1, settle=60.0) as settled:
        pass
    assert settled.load_before == 0.8 and not settled.conditions()["flagged"]
