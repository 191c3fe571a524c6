"""A deterministic synthetic visual-QA testbed on which token-pruning methods separate.

* :func:`generate_scene` -- the scene of a seed: image, per-pixel object map, object list.
* :func:`ask` -- questions of the families ``attribute``, ``existence``, ``counting``, ``relation``,
  ``reading`` about a scene, each with its single-word answer.
* :func:`patch_labels` -- per-patch object / colour / shape / glyph labels (ViT token order).
* :func:`build_splits` -- train / validation / test from disjoint seeds, saved with ``datasets``
  plus ``card.json``; CLI ``python -m zoo_prune.testbed.dataset --out data/testbed``.
"""

from .questions import ANSWERS, FAMILIES, METRICS, ask
from .scenes import COLOURS, GLYPHS, PATCH_COLOURS, PATCH_GLYPHS, PATCH_SHAPES, SHAPES, Scene, SceneObject, \
    generate_scene, patch_labels

_DATASET_NAMES = ("GENERATOR_VERSION", "SPLITS", "build_splits", "contact_sheet", "split_seeds")


def __getattr__(name):
    """The dataset API, imported on first use: an eager import makes ``python -m zoo_prune.testbed.dataset`` warn."""
    if name in _DATASET_NAMES:
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ANSWERS", "COLOURS", "FAMILIES", "GENERATOR_VERSION", "GLYPHS", "METRICS", "PATCH_COLOURS", "PATCH_GLYPHS",
    "PATCH_SHAPES", "SHAPES", "SPLITS", "Scene", "SceneObject", "ask", "build_splits", "contact_sheet",
    "generate_scene", "patch_labels", "split_seeds",
]
