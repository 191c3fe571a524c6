"""Tiny local LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL models with a tokenizer and a processor.

The real transformers classes with small configs and random weights, built without the hub, so
that tests, the demo and later pipeline stages exercise every code path of the real checkpoints
on a CPU in milliseconds::

    model, processor = build_tiny("llava")          # or "llava_next", "qwen2_5_vl"
    inputs = processor(images=image, text=chat_prompt(processor, "what is in the image?"), return_tensors="pt")

Shapes: CLIP tower 32 px / patch 4 (64 visual tokens per image or LLaVA-NeXT patch, anyres grid
up to 2 x 2 crops, so 5 patches); Qwen2.5-VL tower patch 4, 2 x 2 merge; language models with
3 layers (FastV's K = 2 leaves one pruned layer), grouped-query attention. Image processors are the
PIL backends (transformers' default ones need torchvision).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
IMAGE_SIZE = 32
PATCH_SIZE = 4
GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
QWEN_PATCH_SIZE = 4
WORDS = (
    "what is in the image describe this picture a an of on and at to color colour red green blue yellow black white "
    "cat dog bird car tree sky how many yes no there it its shape left right top bottom one two three"
).split()
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]
IMAGE_TOKENS = ["<image>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(words=WORDS):
    """A word-level fast tokenizer with the special tokens of LLaVA and Qwen2.5-VL, left padding.

    ``words``: the vocabulary besides the special tokens, punctuation and chat-role words (duplicates
    are dropped, first occurrence wins); any other word maps to ``<unk>``.
    """
    vocabulary = list(dict.fromkeys(SPECIAL_TOKENS + IMAGE_TOKENS + list(words) + list(".,?!:;")
                                    + ["USER", "ASSISTANT", "user", "assistant"]))
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=IMAGE_TOKENS, padding_side="left",
    )


def _text_config(tokenizer, **overrides) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ) | overrides


def _clip_config(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    return tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )


def _clip_processor_kwargs(tokenizer, patch_size: int = PATCH_SIZE) -> dict:
    return dict(tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
                num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


def build_tiny(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, image_size: int = IMAGE_SIZE,
               patch_size: int | None = None, grid_pinpoints=GRID_PINPOINTS, text: dict | None = None,
               vision: dict | None = None, pixels: tuple[int, int] = (16 * 16, 48 * 48), tokenizer=None):
    """(model, processor) of a tiny ``family`` model (one of :data:`FAMILIES`), eval mode.

    The defaults give the small shapes of the module docstring. The geometry can be set to a real
    checkpoint's while the widths stay tiny (``zoo_prune.rehearsal.checkpoints``): ``image_size`` and
    ``patch_size`` of the CLIP tower (LLaVA families), ``grid_pinpoints`` (LLaVA-NeXT), ``pixels`` =
    (min_pixels, max_pixels) of Qwen2.5-VL's processor, ``patch_size`` and other ``vision`` config
    entries of its tower (``window_size``, ``fullatt_block_indexes``, ``depth``, ...), ``text`` config
    entries of the language model, and the ``tokenizer`` (default :func:`tiny_tokenizer`).
    """
    tokenizer = tokenizer or tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(text or {})
    if family in ("llava", "llava_next"):
        patch_size = patch_size or PATCH_SIZE
        crop = {"height": image_size, "width": image_size}
    if family == "llava":
        config = tf.LlavaConfig(vision_config=_clip_config(image_size, patch_size),
                                text_config=tf.LlamaConfig(**_text_config(tokenizer, **text)),
                                image_token_id=image_token_id, image_seq_length=(image_size // patch_size) ** 2)
        model_class = tf.LlavaForConditionalGeneration
        images = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=crop)
        processor = tf.LlavaProcessor(image_processor=images, **_clip_processor_kwargs(tokenizer, patch_size))
    elif family == "llava_next":
        config = tf.LlavaNextConfig(vision_config=_clip_config(image_size, patch_size),
                                    text_config=tf.LlamaConfig(**_text_config(tokenizer, **text)),
                                    image_token_id=image_token_id, image_grid_pinpoints=grid_pinpoints)
        model_class = tf.LlavaNextForConditionalGeneration
        images = LlavaNextImageProcessorPil(size={"shortest_edge": image_size}, crop_size=crop, image_grid_pinpoints=grid_pinpoints)
        processor = tf.LlavaNextProcessor(image_processor=images, **_clip_processor_kwargs(tokenizer, patch_size))
    elif family == "qwen2_5_vl":
        patch_size = patch_size or QWEN_PATCH_SIZE
        text = dict(_text_config(tokenizer, **text))
        text.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch_size, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=4 * patch_size, out_hidden_size=text["hidden_size"],
                      fullatt_block_indexes=[1]) | (vision or {})
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
               (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"))}
        config = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        model_class = tf.Qwen2_5_VLForConditionalGeneration
        images = Qwen2VLImageProcessorPil(patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                                          temporal_patch_size=vision["temporal_patch_size"], min_pixels=pixels[0], max_pixels=pixels[1])
        processor = QwenProcessorWithoutVideo(image_processor=images, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    else:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config)
    return model.to(dtype).eval(), processor


def chat_prompt(processor, question: str) -> str:
    """One user turn with an image and ``question``, then the assistant's turn, in the processor's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def tiny_image(seed: int = 0, size: tuple[int, int] = (40, 50)):
    """A random RGB PIL image of (height, width) ``size``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class QwenProcessorWithoutVideo(tf.Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor with no video processor (transformers' video processors need torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)
