"""The worked examples of docs/extending.md run as written."""

import re
from pathlib import Path

import torch

from vlm_helpers import prompts
from zoo_prune import available_methods
from zoo_prune.adapters import adapter_class

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_projector_method_example_registers_and_prunes(capsys):
    model, _, inputs = prompts("llava")
    namespace = {"model": model, "inputs": inputs}
    exec(compile(code_blocks()[0], str(DOC), "exec"), namespace)
    assert "top_norm" in available_methods()
    [kept] = eval(capsys.readouterr().out.replace("tensor", "torch.tensor"), {"torch": torch})[:1]
    z = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    assert kept.tolist() == sorted(z.float().norm(dim=-1).topk(16).indices.tolist())  # an independent top-16


def test_the_adapter_example_registers_its_class():
    exec(compile(code_blocks()[1], str(DOC), "exec"), {})
    assert adapter_class("MyVLMForConditionalGeneration").supports == ("projector", "llm")
