"""The testbed VLM: prompts as the chat template writes them, a few training steps lower the loss,
determinism under a seed, the saved folder round-trips, and the committed model answers test questions."""

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from zoo_prune.testbed import ask, build_splits, generate_scene, split_seeds
from zoo_prune.testbed.evaluate import answer, score
from zoo_prune.testbed.model import TestbedConfig as ModelConfig, build_model
from zoo_prune.testbed.train import TrainConfig, conversation, plot_loss, train
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

    The committed model is below the issue's target (see its README): it scored 0.375 here when committed.
    """
    model = LlavaForConditionalGeneration.from_pretrained(COMMITTED).eval()
    processor = AutoProcessor.from_pretrained(COMMITTED)
    scenes = [generate_scene(s) for s in split_seeds("test", 8)]
    questions = [(scene, q) for scene in scenes for q in ask(scene)]
    predictions = answer(model, processor, [s.image for s, _ in questions], [q["question"] for _, q in questions])
    accuracy = score("attribute", predictions, [q["answer"] for _, q in questions])  # plain accuracy
    assert accuracy >= 0.35, list(zip(predictions, [q["answer"] for _, q in questions]))
