"""lmms-eval model ``zoo_prune_qwen2_5_vl``: lmms-eval's chat ``qwen2_5_vl`` with pruning (it batches
by itself). A module of its own because that backend needs ``qwen-vl-utils``, which imports
torchvision: the LLaVA class must not depend on it."""

from __future__ import annotations

from lmms_eval.models.chat import qwen2_5_vl

from .lmms_eval import PruningModel

if not qwen2_5_vl._has_qwen_vl:
    raise ImportError(
        "Qwen2.5-VL checkpoints run on lmms-eval's qwen2_5_vl, which needs qwen-vl-utils "
        "(pip install qwen-vl-utils; it imports torchvision, so install the torchvision build matching torch)"
    )


class ZooPruneQwen2_5_VL(PruningModel, qwen2_5_vl.Qwen2_5_VL):
    """lmms-eval's chat ``qwen2_5_vl`` with pruning."""
