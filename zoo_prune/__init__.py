"""zoo-prune: training-free visual-token pruning by zeroth-order sensitivity (ZOO-Prune).

Library entry points:

* :func:`zo_sensitivity` -- per-token sensitivity at the multimodal projector (paper Eq. 2-3).
* :func:`select_tokens` -- sensitivity-aware diversity selection (Eq. 4-5) and its Table-5 variants.
* :func:`get_method` / :func:`available_methods` / :func:`register_method` -- methods by name.
* :func:`apply_pruning` -- pruning inside a Hugging Face VLM; :func:`adapter_for` -- its public model API.
"""

from .adapters import ModelAdapter, adapter_for, register_adapter
from .methods import KINDS, PruningMethod, available_methods, get_method, method_class, register_method
from .pruned_model import PruningHandle, apply_pruning
from .projector import GroupedProjector
from .selection import FUSIONS, keep_count, normalize_sensitivity, select_tokens
from .sensitivity import ESTIMATORS, draw_directions, precompute, zo_sensitivity

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "KINDS",
    "ModelAdapter",
    "adapter_for",
    "method_class",
    "register_adapter",
    "FUSIONS",
    "GroupedProjector",
    "PruningHandle",
    "PruningMethod",
    "apply_pruning",
    "available_methods",
    "draw_directions",
    "get_method",
    "keep_count",
    "normalize_sensitivity",
    "precompute",
    "register_method",
    "select_tokens",
    "zo_sensitivity",
]
