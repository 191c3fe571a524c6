"""Stand-in checkpoints of the paper's four models (zoo_prune.rehearsal.checkpoints): the real classes
and the real image geometry, loaded back the way lmms-eval loads a checkpoint folder.

Expected token counts are worked by hand from the published geometry: LLaVA-1.5 336 px / patch 14 ->
24 x 24 = 576; LLaVA-NeXT on a 672 x 672 image -> grid pinpoint 672 x 672 (2 x 2 crops): base 576 +
48 x 48 crop tokens + 48 row newlines = 2928; Qwen2.5-VL on 672 x 672 -> 48 x 48 patches of 14 px,
2 x 2 merge -> 576 tokens.
"""

from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from PIL import Image

from zoo_prune.rehearsal.checkpoints import STANDINS, build_standins

REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6-vicuna-7b-hf


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.set_num_threads(1)
    return build_standins(tmp_path_factory.mktemp("ckpt") / "standins")


def llava_inputs(processor, size):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[Image.new("RGB", size, (90, 140, 200))], text=prompt, return_tensors="pt")


def test_one_stand_in_per_paper_model_with_a_random_weights_readme(folders):
    params = yaml.safe_load((Path(__file__).resolve().parent.parent / "paper" / "params.yaml").read_text())
    assert list(folders) == list(params["paper"]["models"]) == list(STANDINS)
    for name, folder in folders.items():
        readme = (folder / "README.md").read_text()
        assert readme.startswith(f"# {name}: RANDOM WEIGHTS stand-in") and "Not " + name in readme
    assert (folders["llava-1.5-7b"].parent / "standins.json").is_file()


@pytest.mark.parametrize("name, cls, tokens", [
    ("llava-1.5-7b", tf.LlavaForConditionalGeneration, 576),
    ("llava-1.5-13b", tf.LlavaForConditionalGeneration, 576),
    ("llava-next-7b", tf.LlavaNextForConditionalGeneration, 576 + 48 * 48 + 48),
])
def test_llava_stand_ins_load_and_see_the_real_token_counts(folders, name, cls, tokens):
    model = tf.AutoModelForImageTextToText.from_pretrained(folders[name]).eval()
    processor = tf.AutoProcessor.from_pretrained(folders[name])
    assert type(model) is cls
    assert processor.image_processor.crop_size["height"] == 336 and processor.patch_size == 14
    if name == "llava-next-7b":
        assert model.config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints == REAL_PINPOINTS
    inputs = llava_inputs(processor, (672, 672))
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    layers = model.config.text_config.num_hidden_layers
    assert layers == (4 if name == "llava-1.5-13b" else 3)


def test_qwen_stand_in_has_the_real_processor_limits_and_window_attention(folders):
    folder = folders["qwen2.5-vl-7b"]
    model = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(model) is tf.Qwen2_5_VLForConditionalGeneration
    vision = model.config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size, vision.window_size) == (14, 2, 2, 112)
    assert vision.fullatt_block_indexes == [1, 3] and vision.depth == 4  # windowed blocks between full ones
    images = tf.AutoImageProcessor.from_pretrained(folder)  # the processor's video half needs torchvision
    assert (images.size.shortest_edge, images.size.longest_edge) == (3136, 12845056)
    batch = images(images=[Image.new("RGB", (672, 672), (200, 60, 60))], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 48, 48]]
    with torch.no_grad():
        merged = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    assert merged.shape == (48 * 48 // 4, model.config.text_config.hidden_size)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    assert "<|vision_start|><|image_pad|><|vision_end|>" in (folder / "chat_template.jinja").read_text()


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'llava-2'"):
        build_standins(tmp_path / "x", ["llava-1.5-7b", "llava-2"])
    assert not list(tmp_path.iterdir())
