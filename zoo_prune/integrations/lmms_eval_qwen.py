"""lmms-eval model ``zoo_prune_qwen2_5_vl``: lmms-eval's chat ``qwen2_5_vl`` with pruning (it batches
by itself). A module of its own because that backend needs ``qwen-vl-utils``, which imports
torchvision: the LLaVA class must not depend on it. requirements-rehearse.txt installs both (with the
torch build that torchvision's wheel is made for; ``make install-rehearse`` builds .venv-rehearse)."""

from __future__ import annotations

from lmms_eval.models.chat import qwen2_5_vl

from .lmms_eval import PruningModel

if not qwen2_5_vl._has_qwen_vl:
    raise ImportError(
        "Qwen2.5-VL checkpoints run on lmms-eval's qwen2_5_vl, which needs qwen-vl-utils: it imports "
        "torchvision, whose wheel must match the installed torch build (PyPI's torchvision 0.28.0 is built for "
        "the CUDA build of torch 2.13.0, not the CPU one); requirements-rehearse.txt holds a working set "
        "(make install-rehearse)"
    )


class ZooPruneQwen2_5_VL(PruningModel, qwen2_5_vl.Qwen2_5_VL):
    """lmms-eval's chat ``qwen2_5_vl`` with pruning."""
