"""python -m zoo_prune.demo on the tiny local models."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_helpers import one_thread  # noqa: F401  (a fixture)
from zoo_prune import apply_pruning
from zoo_prune.demo import DIM, highlight, main, parse_keep, prompt_inputs, token_views
from zoo_prune.tiny import build_tiny, tiny_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family, keep", [("llava", "16"), ("llava_next", "40"), ("qwen2_5_vl", "0.25")])
def test_demo_prints_answers_and_writes_side_by_side_panels(tmp_path, capsys, family, keep):
    image = tmp_path / "image.png"
    tiny_image(3, (48, 64)).save(image)
    outputs = {}
    for methods in (["zoo"], ["zoo", "divprune"]):
        out = tmp_path / f"{len(methods)}.png"
        argv = ["--tiny", family, "--image", str(image), "--question", "what is in the image?", "--keep", keep,
                "--max-new-tokens", "3", "--out", str(out)]
        assert main(argv + [arg for m in methods for arg in ("--method", m)]) == 0
        printed = capsys.readouterr().out
        assert all(f"{m}: " in printed for m in ["unpruned"] + methods) and f"wrote {out}" in printed
        outputs[len(methods)] = Image.open(out)
    assert outputs[2].width > 1.5 * outputs[1].width  # one panel per method, side by side


def test_drawn_mask_is_the_handles_kept_tokens():
    model, processor = build_tiny("llava")
    image = tiny_image(4)
    inputs = prompt_inputs(model, processor, image, "what is in the image?")
    with apply_pruning(model, "zoo", keep=10) as handle:
        model.generate(**inputs, max_new_tokens=1)
        kept = handle.kept_indices[0]
    [(_, view, mask)] = token_views(model, processor, image, inputs, kept)
    assert view.shape == (32, 32, 3) and mask.shape == (8, 8)
    assert sorted(np.flatnonzero(mask).tolist()) == kept.tolist()
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
    mean, std = torch.tensor(processor.image_processor.image_mean), torch.tensor(processor.image_processor.image_std)
    np.testing.assert_allclose(view, (pixels.permute(1, 2, 0) * std + mean).clamp(0, 1).numpy(), atol=1e-6)


def test_highlight_dims_pruned_patches_only():
    view = np.ones((4, 4, 3))
    shown = highlight(view, np.array([[True, False], [False, True]]))
    assert shown[0, 0, 0] == 1 and shown[1, 1, 0] == 1 and shown[3, 3, 0] == 1
    assert shown[0, 2, 0] == DIM and shown[3, 0, 0] == DIM


def test_keep_is_a_count_or_a_ratio():
    assert parse_keep("64") == 64 and isinstance(parse_keep("64"), int)
    assert parse_keep("0.2") == 0.2


def test_an_unsupported_method_is_refused_before_any_method_runs(tmp_path, capsys, monkeypatch):
    """``--method zoo --method visionzip`` on Qwen2.5-VL (no vision-stage methods there): an error
    naming both, before the first method generates anything, and no picture."""
    image = tmp_path / "image.png"
    tiny_image(3, (48, 64)).save(image)
    ran = []
    monkeypatch.setattr("zoo_prune.demo.answer", lambda *args, **kwargs: ran.append(1) or "")
    out = tmp_path / "demo.png"
    with pytest.raises(SystemExit) as exited:
        main(["--tiny", "qwen2_5_vl", "--image", str(image), "--question", "q", "--keep", "0.25", "--out", str(out),
              "--method", "zoo", "--method", "visionzip"])
    assert exited.value.code == 2 and not ran and not out.exists()
    message = capsys.readouterr().err
    assert "'visionzip'" in message and "Qwen2_5_VLForConditionalGeneration" in message
