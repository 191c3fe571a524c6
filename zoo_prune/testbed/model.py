"""The testbed's small LLaVA-1.5: an untrained model and its processor from a :class:`TestbedConfig`.

A real ``LlavaForConditionalGeneration`` (CLIP vision tower, Linear-GELU-Linear projector, Llama)
with a word-level tokenizer over the testbed's questions and answers and a CLIP image processor
(PIL backend), so that ``save_pretrained`` of both into one folder loads offline with
``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``::

    model, processor = build_model(TestbedConfig())
    prompt = chat_prompt(processor, "what colour is the circle?")   # zoo_prune.tiny
    inputs = processor(images=image, text=prompt, return_tensors="pt")

The projector reads the tower's *last* layer (``vision_feature_layer=-1``): stage A of the training
trains that layer's per-patch features; the CLS token is dropped ("default" strategy).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import transformers as tf
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .. import tiny
from .questions import ANSWERS, PLURALS, RELATIONS, TEMPLATES
from .scenes import BOX, COLOURS, GLYPHS, SHAPES


@dataclass
class TestbedConfig:
    """Sizes of the testbed VLM. 96 px / patch 8 = 144 visual tokens (patch 4: 576, as LLaVA-1.5)."""

    image_size: int = 96
    patch_size: int = 8
    vision_width: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    max_positions: int = 1024

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def as_dict(self) -> dict:
        return asdict(self)


def testbed_words() -> list[str]:
    """Every word of the testbed's question templates and answers (the tokenizer's vocabulary)."""
    words = []
    for templates in TEMPLATES.values():
        for template in templates:
            words += re.sub(r"\{\w+\}", " ", template).replace("?", " ").split()
    words += [*COLOURS, *SHAPES, *PLURALS.values(), BOX, *GLYPHS, *" ".join(RELATIONS).split()]
    for answers in ANSWERS.values():
        words += answers
    return list(dict.fromkeys(words))


def build_processor(config: TestbedConfig) -> tf.LlavaProcessor:
    """Word-level tokenizer (left padding, LLaVA chat template) + CLIP image processor at ``image_size``."""
    if config.image_size % config.patch_size:
        raise ValueError(f"image_size={config.image_size} is not a multiple of patch_size={config.patch_size}")
    tokenizer = tiny.tiny_tokenizer(testbed_words())
    images = CLIPImageProcessorPil(size={"shortest_edge": config.image_size},
                                   crop_size={"height": config.image_size, "width": config.image_size})
    return tf.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=config.patch_size,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1,
                             chat_template=tiny.LLAVA_CHAT_TEMPLATE)


def build_model(config: TestbedConfig | None = None, *, seed: int = 0):
    """(untrained model in train mode, processor) of ``config``; weights drawn under ``seed``."""
    config = config or TestbedConfig()
    processor = build_processor(config)
    tokenizer = processor.tokenizer
    vision = tf.CLIPVisionConfig(
        hidden_size=config.vision_width, intermediate_size=4 * config.vision_width,
        num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
        image_size=config.image_size, patch_size=config.patch_size, projection_dim=config.vision_width,
    )
    text = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads, max_position_embeddings=config.max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    llava = tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=config.tokens_per_image, vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf.LlavaForConditionalGeneration(llava)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.float(), processor
