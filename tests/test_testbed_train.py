"""The testbed VLM: prompts as the chat template writes them, a few training steps lower the loss,
determinism under a seed, the saved folder round-trips, and the committed model answers test questions."""

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from zoo_prune.testbed import ask, build_splits, generate_scene, split_seeds
from zoo_prune.testbed.evaluate import answer, score
from zoo_prune.testbed.model import TestbedConfig as ModelConfig, build_model
from zoo_prune.testbed.train import (TrainConfig, background_rate, conversation, curriculum_tokens, lm_loss, plot_loss,
                                    train)
from zoo_prune.tiny import chat_prompt

COMMITTED = Path(__file__).resolve().parents[1] / "models" / "testbed-llava"
SMALL = ModelConfig(vision_width=16, vision_layers=1, vision_heads=2, text_width=32, text_layers=1, text_heads=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not thrash a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed") / "data"
    build_splits(out, sizes={"train": 8, "validation": 4, "test": 4}, progress=False)
    return out


def small_run(data, seed=0):
    cfg = TrainConfig(seed=seed, a_steps=5, a_batch=8, a_lr=1e-2, b_steps=5, b_batch=8, b_lr=1e-2, c_steps=5,
                      c_batch=8, c_lr=1e-2, d_steps=5, d_lr=1e-2, model=SMALL)
    return train(data, cfg, progress=False)


@pytest.fixture(scope="module")
def run(data):
    return small_run(data)


def test_first_turn_is_the_evaluation_prompt():
    model, processor = build_model(SMALL)
    qa = {"question": "what colour is the circle?", "answer": "red"}
    image = generate_scene(7).image
    expected = processor(images=image, text=chat_prompt(processor, qa["question"]), return_tensors="pt")["input_ids"][0]
    image_ids = [model.config.image_token_id] * SMALL.tokens_per_image
    ids, labels = conversation(processor.tokenizer, image_ids, [qa, {"question": "is there a red circle?", "answer": "yes"}])
    n = len(expected)
    assert ids[:n] == expected.tolist()
    assert processor.tokenizer.decode(ids[n:n + 2]) == "red</s>" or ids[n + 1] == processor.tokenizer.eos_token_id
    answers = [t for t, y in zip(ids, labels) if y != -100]
    assert processor.tokenizer.convert_ids_to_tokens(answers) == ["red", "</s>", "yes", "</s>"]


def test_a_few_steps_lower_every_stage_loss_and_are_deterministic(data, run, tmp_path):
    _, _, first = run
    _, _, again = small_run(data)
    for stage in "ABCD":
        losses = [r["loss"] for r in first["log"] if r["stage"] == stage]
        assert losses[-1] < losses[0], (stage, losses)
    assert first["log"] == again["log"]
    plot_loss(first["log"], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_curriculum_shows_object_tokens_first_then_adds_the_background(run):
    # 100 steps, 25% objects only, then 25% ramp: hand-worked rates
    assert [background_rate(t, 100, 0.25, 0.25) for t in (0, 24, 25, 30, 45, 50, 99)] == [0, 0, 0, 0.2, 0.8, 1, 1]
    objects = torch.zeros(144, dtype=torch.bool)
    objects[[3, 4, 15, 16, 100]] = True
    generator = torch.Generator().manual_seed(0)
    assert curriculum_tokens(objects, 0.0, generator).tolist() == [3, 4, 15, 16, 100]
    assert curriculum_tokens(objects, 1.0, generator) is None
    shown = [curriculum_tokens(objects, 0.5, generator) for _ in range(200)]
    assert all(set(objects.nonzero().flatten().tolist()) <= set(s.tolist()) and bool((s.diff() > 0).all()) for s in shown)
    assert abs(sum(len(s) - 5 for s in shown) / (200 * 139) - 0.5) < 0.02
    # the small run's stage D (5 steps of 25% + 25%): 0, 0, then (2 - 1.25) / 1.25, then everything
    _, _, info = run
    assert [r["background"] for r in info["log"] if r["stage"] == "D"] == pytest.approx([0, 0, 0.6, 1, 1])


def test_lm_loss_of_a_batch_with_different_token_counts_is_the_mean_of_its_conversations():
    model, processor = build_model(SMALL)
    image_id, tokenizer = model.config.image_token_id, processor.tokenizer
    width = model.config.text_config.hidden_size
    qas = [[{"question": "what colour is the circle?", "answer": "red"}],
           [{"question": "how many squares are there?", "answer": "2"}, {"question": "is there a red cross?", "answer": "no"}]]
    visual = [torch.randn(n, width, generator=torch.Generator().manual_seed(n)) for n in (3, 5)]  # 3 and 5 image tokens
    batch = [conversation(tokenizer, [image_id] * len(v), q) for v, q in zip(visual, qas)]
    with torch.no_grad():
        together = lm_loss(model, visual, batch, tokenizer.pad_token_id, image_id)
        alone = [lm_loss(model, [v], [b], tokenizer.pad_token_id, image_id) for v, b in zip(visual, batch)]
    answers = [sum(y != -100 for y in labels) for _, labels in batch]  # 2 and 4 answer tokens
    torch.testing.assert_close(together, (alone[0] * answers[0] + alone[1] * answers[1]) / sum(answers))


def test_saved_folder_round_trips(run, tmp_path):
    model, processor, _ = run
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert loaded_processor.chat_template == processor.chat_template
    question = "how many circles are there?"
    assert chat_prompt(loaded_processor, question) == f"USER: <image>\n{question} ASSISTANT:"
    inputs = loaded_processor(images=generate_scene(3).image, text=chat_prompt(loaded_processor, question), return_tensors="pt")
    assert (inputs["input_ids"] == loaded.config.image_token_id).sum() == SMALL.tokens_per_image
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.skipif(not (COMMITTED / "config.json").exists(), reason="no committed testbed model")
def test_committed_model_answers_test_questions_above_chance():
    """40 test questions (8 images x 5 families); answering from the priors alone scores about 0.29.

    The committed model scored 0.90 here when committed (attribute, existence and reading 8/8, counting 7/8,
    relation 5/8; 88.3% over the whole test split, see its README).
    """
    model = LlavaForConditionalGeneration.from_pretrained(COMMITTED).eval()
    processor = AutoProcessor.from_pretrained(COMMITTED)
    scenes = [generate_scene(s) for s in split_seeds("test", 8)]
    questions = [(scene, q) for scene in scenes for q in ask(scene)]
    predictions = answer(model, processor, [s.image for s, _ in questions], [q["question"] for _, q in questions])
    accuracy = score("attribute", predictions, [q["answer"] for _, q in questions])  # plain accuracy
    assert accuracy >= 0.75, list(zip(predictions, [q["answer"] for _, q in questions]))
