"""Pruning methods by name: ``get_method(name, **options)``, ``available_methods(kind=None)``,
``register_method(name)`` and each method's registry metadata (``method_class(name)``).

Projector stage: ``zoo`` (ZOO-Prune), ``sum_fusion`` and ``sensitivity_only`` (Table 5), ``divprune``,
``random``, ``pooling``; vision stage: ``visionzip``; LLM stage: ``fastv``, ``sparsevlm``. One file per
method; the three kinds and the registry are in :mod:`zoo_prune.methods.base`.
"""

from .base import (
    KINDS,
    Attachment,
    LLMMethod,
    ProjectorMethod,
    PruningMethod,
    VisionMethod,
    available_methods,
    get_method,
    method_class,
    register_method,
)
from . import divprune, pooling, random, zoo  # noqa: E402,F401  (register the methods)
from . import fastv, sparsevlm, visionzip  # noqa: E402,F401  (vision and LLM stage)

__all__ = ["KINDS", "Attachment", "LLMMethod", "ProjectorMethod", "PruningMethod", "VisionMethod",
           "available_methods", "get_method", "method_class", "register_method"]
