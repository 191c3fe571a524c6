"""zoo-prune: training-free visual-token pruning by zeroth-order sensitivity (ZOO-Prune).

Library entry points:

* :func:`zo_sensitivity` -- per-token sensitivity at the multimodal projector (paper Eq. 2-3).
* :func:`select_tokens` -- sensitivity-aware diversity selection (Eq. 4-5) and its Table-5 variants.
* :func:`get_method` / :func:`available_methods` / :func:`register_method` / :func:`method_class` --
  methods by name and their registry metadata.
* :func:`apply_pruning` -- pruning inside a Hugging Face VLM; :func:`adapter_for` -- its public model API.

The names are imported on first use (PEP 562), so that ``zoo_prune.testbed`` or ``zoo_prune.tiny``
load without the whole library: a DVC stage that only generates data then depends only on the
modules it really runs (tests/test_dvc_deps.py reads ``_EXPORTS``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_EXPORTS = {
    "ModelAdapter": "adapters", "adapter_for": "adapters", "register_adapter": "adapters",
    "KINDS": "methods", "PruningMethod": "methods", "available_methods": "methods", "get_method": "methods",
    "method_class": "methods", "register_method": "methods",
    "PruningHandle": "pruned_model", "apply_pruning": "pruned_model",
    "GroupedProjector": "projector",
    "FUSIONS": "selection", "keep_count": "selection", "normalize_sensitivity": "selection", "select_tokens": "selection",
    "ESTIMATORS": "sensitivity", "draw_directions": "sensitivity", "precompute": "sensitivity", "zo_sensitivity": "sensitivity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from .adapters import ModelAdapter, adapter_for, register_adapter
    from .methods import KINDS, PruningMethod, available_methods, get_method, method_class, register_method
    from .projector import GroupedProjector
    from .pruned_model import PruningHandle, apply_pruning
    from .selection import FUSIONS, keep_count, normalize_sensitivity, select_tokens
    from .sensitivity import ESTIMATORS, draw_directions, precompute, zo_sensitivity
