"""Question families over a scene, each answerable from its object list alone.

Every question is a dict ``{"family", "question", "answer", "objects"}``: ``objects`` lists the
indices (into ``scene.objects``) of the objects the answer depends on. Answers are single words.

* ``attribute`` (GQA-like): "what colour is the triangle?" (the shape occurs once) or
  "which shape is red?" (the colour occurs once among shapes).
* ``existence`` (POPE-like, F1): "is there a red triangle?"; yes / no alternate with the seed, so
  consecutive seeds are exactly balanced; every "no" is adversarial: the asked shape or colour
  (or both) is in the scene, just not together.
* ``counting``: "how many circles are there?", one per scene, about its group shape (0..MAX_GROUP
  copies, uniform), so the answers are balanced.
* ``relation`` (one hop): "is the circle left of the square?" / "... above the ...", about two
  shapes that occur once and whose boxes do not overlap along that axis; yes / no as existence.
* ``reading`` (TextVQA-like): "what digit is in the green box?".
"""

from __future__ import annotations

from collections import Counter
from itertools import permutations

import numpy as np

from .._checks import check_choice, check_int

from .scenes import BOX, COLOURS, GLYPHS, MAX_GROUP, SHAPES, Scene

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
RELATIONS = {"left of": 0, "above": 1}  # relation -> bbox axis (0 = x, 1 = y)
ANSWERS = {
    "attribute": (*COLOURS, *SHAPES),
    "existence": ("yes", "no"),
    "counting": tuple(str(n) for n in range(MAX_GROUP + 1)),
    "relation": ("yes", "no"),
    "reading": GLYPHS,
}
FAMILIES = tuple(ANSWERS)
METRICS = {family: "f1" if family == "existence" else "accuracy" for family in FAMILIES}
TEMPLATES = {
    "attribute": ("what colour is the {shape}?", "which shape is {colour}?"),
    "existence": ("is there a {colour} {shape}?",),
    "counting": ("how many {shapes} are there?",),
    "relation": tuple(f"is the {{shape}} {r} the {{other}}?" for r in RELATIONS),
    "reading": ("what digit is in the {colour} box?",),
}


def _qa(family: str, question: str, answer: str, objects) -> dict:
    return {"family": family, "question": question, "answer": answer, "objects": [int(i) for i in objects]}


def _shapes(scene: Scene) -> list[int]:
    return [i for i, o in enumerate(scene.objects) if o.shape != BOX]


def _unique(scene: Scene, key: str) -> list[int]:
    """Indices of shapes whose ``key`` (shape or colour) occurs once among the scene's shapes."""
    counts = Counter(getattr(scene.objects[i], key) for i in _shapes(scene))
    return [i for i in _shapes(scene) if counts[getattr(scene.objects[i], key)] == 1]


def _yes_no(scene: Scene, j: int) -> str:
    """Alternating answers, phase set by the seed: consecutive seeds balance exactly."""
    return "yes" if (scene.seed + j) % 2 == 0 else "no"


def attribute(scene: Scene, count: int, rng: np.random.Generator) -> list[dict]:
    """Asks alternate between "what colour is the <shape>?" and "which shape is <colour>?" (phase: seed)."""
    pools = [list(rng.permutation(_unique(scene, "shape"))), list(rng.permutation(_unique(scene, "colour")))]
    questions = []
    for j in range(count):
        by_shape = (scene.seed + j) % 2 == 0
        pool = pools[0] if (by_shape and pools[0]) or not pools[1] else pools[1]
        if not pool:
            break
        i = int(pool.pop())
        o = scene.objects[i]
        if pool is pools[0]:
            questions.append(_qa("attribute", f"what colour is the {o.shape}?", o.colour, [i]))
        else:
            questions.append(_qa("attribute", f"which shape is {o.colour}?", o.shape, [i]))
    return questions


def existence(scene: Scene, count: int, rng: np.random.Generator) -> list[dict]:
    shapes = _shapes(scene)
    present = {(scene.objects[i].colour, scene.objects[i].shape) for i in shapes}
    present_colours = {c for c, _ in present}
    present_shapes = {s for _, s in present}
    negatives = [(c, s) for c in COLOURS for s in SHAPES
                 if (c, s) not in present and (c in present_colours or s in present_shapes)]
    positives = [(scene.objects[i].colour, scene.objects[i].shape) for i in shapes]
    order = {"yes": list(rng.permutation(len(positives))), "no": list(rng.permutation(len(negatives)))}
    questions = []
    for j in range(count):
        answer = _yes_no(scene, j)
        if not order[answer]:
            break
        colour, shape = (positives if answer == "yes" else negatives)[order[answer].pop()]
        related = [i for i in shapes if scene.objects[i].colour == colour or scene.objects[i].shape == shape]
        questions.append(_qa("existence", f"is there a {colour} {shape}?", answer, related))
    return questions


def counting(scene: Scene, count: int, rng: np.random.Generator) -> list[dict]:
    """One question per scene, about its group shape: answers uniform over 0..MAX_GROUP.

    (Asking about the other shapes too would flood the answers with 0 and 1.)
    """
    counted = [i for i in _shapes(scene) if scene.objects[i].shape == scene.group_shape]
    return [_qa("counting", f"how many {PLURALS[scene.group_shape]} are there?", str(len(counted)), counted)]


def relation(scene: Scene, count: int, rng: np.random.Generator) -> list[dict]:
    """Ordered pairs (a, b, relation) where a is strictly left of / above b (disjoint along the axis)."""
    true = [(a, b, r) for a, b in permutations(_unique(scene, "shape"), 2) for r, axis in RELATIONS.items()
            if scene.objects[a].bbox[axis + 2] <= scene.objects[b].bbox[axis]]
    order = list(rng.permutation(len(true)))
    questions = []
    for j in range(min(count, len(true))):
        a, b, r = true[order[j]]
        answer = _yes_no(scene, j)
        if answer == "no":
            a, b = b, a
        shape, other = scene.objects[a].shape, scene.objects[b].shape
        questions.append(_qa("relation", f"is the {shape} {r} the {other}?", answer, [a, b]))
    return questions


def reading(scene: Scene, count: int, rng: np.random.Generator) -> list[dict]:
    boxes = [i for i, o in enumerate(scene.objects) if o.shape == BOX]
    return [_qa("reading", f"what digit is in the {scene.objects[i].colour} box?", scene.objects[i].glyph, [i])
            for i in rng.permutation(boxes)[:count]]


ASK = {"attribute": attribute, "existence": existence, "counting": counting, "relation": relation,
       "reading": reading}


def check_families(families) -> tuple[str, ...]:
    families = (families,) if isinstance(families, str) else tuple(families)
    if not families:
        raise ValueError("families is empty; choose from " + ", ".join(FAMILIES))
    for family in families:
        check_choice("question family", family, FAMILIES)
    return families


def ask(scene: Scene, families=FAMILIES, per_family: int = 1) -> list[dict]:
    """Up to ``per_family`` questions of each family (fewer when the scene allows fewer).

    The questions depend only on the scene and ``per_family``: each family draws from its own
    generator seeded by (scene seed, family), so adding a family does not change the others.
    """
    families = check_families(families)
    check_int("per_family", per_family)
    questions = []
    for family in families:
        rng = np.random.Generator(np.random.PCG64([scene.seed, 1 + FAMILIES.index(family)]))
        questions += ASK[family](scene, per_family, rng)
    return questions
