"""The synthetic testbed: determinism, disjoint splits, answers recomputed from the object list,
per-patch labels against the drawn pixels, and the saved datasets and card."""

import json
import re

import numpy as np
import pytest

from zoo_prune.testbed import (ANSWERS, COLOURS, FAMILIES, PATCH_COLOURS, PATCH_GLYPHS, PATCH_SHAPES, SHAPES, SPLITS,
                               SceneObject, ask, build_splits, generate_scene, patch_labels, split_seeds)
from zoo_prune.testbed.dataset import load_split, png_bytes
from zoo_prune.testbed.scenes import COLOUR_JITTER

SEEDS = range(5000, 5060)


def shapes_of(scene):
    return [o for o in scene.objects if o.shape != "box"]


def only(objects):
    assert len(objects) == 1, objects
    return objects[0]


def test_same_seed_same_bytes_and_different_seeds_differ():
    a, b = generate_scene(123), generate_scene(123)
    assert png_bytes(a.image) == png_bytes(b.image)
    assert png_bytes(a.object_map) == png_bytes(b.object_map)
    assert a.objects == b.objects and ask(a, FAMILIES, 2) == ask(b, FAMILIES, 2)
    assert not np.array_equal(a.image, generate_scene(124).image)
    small = generate_scene(123, image_size=48)
    assert small.image.shape == (48, 48, 3) and small.patch_labels(4)["object"].shape == (144,)
    assert a.patch_labels(4)["object"].shape == (576,)


def test_split_seeds_disjoint():
    ranges = [split_seeds(split, 1_000_000, seed) for seed in (0, 1) for split in SPLITS]
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            assert max(a.start, b.start) >= min(a.stop, b.stop), (a, b)
    with pytest.raises(ValueError, match="1000001"):
        split_seeds("train", 1_000_001)


@pytest.mark.parametrize("per_image", [1, 2])
def test_existence_balanced_with_adversarial_negatives(per_image):
    answers = []
    for seed in SEEDS:
        scene = generate_scene(seed)
        pairs = {(o.colour, o.shape) for o in shapes_of(scene)}
        for q in ask(scene, ["existence"], per_image):
            colour, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", q["question"]).groups()
            assert q["answer"] == ("yes" if (colour, shape) in pairs else "no")
            if q["answer"] == "no":  # adversarial: the shape or the colour is there, not together
                assert any(o.shape == shape or o.colour == colour for o in shapes_of(scene))
            answers.append(q["answer"])
    assert answers.count("yes") == answers.count("no") == len(SEEDS) * per_image / 2


def expected_answer(scene, question):
    """The answer recomputed from the object list, parsing the question text."""
    shapes = shapes_of(scene)
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        return only([o for o in shapes if o.shape == m[1]]).colour
    if m := re.fullmatch(r"which shape is (\w+)\?", question):
        return only([o for o in shapes if o.colour == m[1]]).shape
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(m[1] in (o.shape + "s", o.shape + "es") for o in shapes))
    if m := re.fullmatch(r"is the (\w+) (left of|above) the (\w+)\?", question):
        a, b = (only([o for o in shapes if o.shape == name]) for name in (m[1], m[3]))
        axis = 0 if m[2] == "left of" else 1
        assert a.bbox[axis + 2] <= b.bbox[axis] or b.bbox[axis + 2] <= a.bbox[axis], "ambiguous relation"
        return "yes" if a.bbox[axis + 2] <= b.bbox[axis] else "no"
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in shapes) else "no"
    if m := re.fullmatch(r"what digit is in the (\w+) box\?", question):
        return only([o for o in scene.objects if o.shape == "box" and o.colour == m[1]]).glyph
    raise AssertionError(f"unparsed question {question!r}")


def test_answers_consistent_with_objects_for_every_family():
    seen = {family: set() for family in FAMILIES}
    for seed in SEEDS:
        scene = generate_scene(seed)
        questions = ask(scene, FAMILIES, 2)
        assert len({q["question"] for q in questions}) == len(questions)
        for q in questions:
            assert q["answer"] == expected_answer(scene, q["question"]), (seed, q)
            assert q["answer"] in ANSWERS[q["family"]]
            seen[q["family"]].add(q["answer"])
    assert all(len(answers) >= 2 for answers in seen.values()), seen
    assert seen["counting"] == set(ANSWERS["counting"])


@pytest.mark.parametrize("image_size", [96, 48])
def test_patch_labels_match_drawn_pixels(image_size, patch=4, min_coverage=0.25):
    threshold = min_coverage * patch * patch
    palette = np.array(list(COLOURS.values()), dtype=int)
    for seed in range(40, 46):
        scene = generate_scene(seed, image_size)
        labels = scene.patch_labels(patch, min_coverage)
        grid = image_size // patch
        blocks = scene.image.astype(int).reshape(grid, patch, grid, patch, 3).transpose(0, 2, 1, 3, 4).reshape(
            grid * grid, -1, 3)
        near = (np.abs(blocks[:, :, None] - palette).max(-1) <= COLOUR_JITTER).sum(1)  # (N, colours) pixel counts
        for k, obj_id in enumerate(labels["object"]):
            if obj_id == 0:
                assert labels["colour"][k] == labels["shape"][k] == labels["glyph"][k] == 0
                if image_size == 96:  # gaps of 3 px: no patch holds two objects
                    assert near[k].max() < threshold, (seed, k)
                continue
            o = scene.objects[obj_id - 1]
            assert PATCH_COLOURS[labels["colour"][k]] == o.colour and PATCH_SHAPES[labels["shape"][k]] == o.shape
            assert PATCH_GLYPHS[labels["glyph"][k]] == (o.glyph or "none")
            if o.shape == "box":  # frame, white margin or black ink
                white_or_ink = (blocks[k].min(-1) >= 230) | (blocks[k].max(-1) <= 30)
                assert near[k, list(COLOURS).index(o.colour)] + white_or_ink.sum() >= threshold
            else:
                assert near[k, list(COLOURS).index(o.colour)] >= threshold, (seed, k, o)
        for o in shapes_of(scene):  # every shape is visible: its centre pixel has its colour
            x0, y0, x1, y1 = o.bbox
            centre = scene.image[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
            assert np.abs(centre - COLOURS[o.colour]).max() <= COLOUR_JITTER


def test_build_save_load_round_trip_and_card(tmp_path):
    from datasets import load_from_disk

    sizes = {"train": 5, "validation": 3, "test": 4}
    card = build_splits(tmp_path / "tb", image_size=48, sizes=sizes, per_family={"train": 2}, progress=False)
    assert json.loads((tmp_path / "tb" / "card.json").read_text()) == card
    assert card["tokens_per_image"] == 144 and card["splits"]["test"]["seeds"] == [2_000_000, 2_000_004]
    scenes = load_from_disk(str(tmp_path / "tb" / "scenes"))
    assert {s: len(scenes[s]) for s in SPLITS} == sizes
    row = scenes["validation"][1]
    scene = generate_scene(row["seed"], 48)
    assert row["seed"] == 1_000_001
    assert np.array_equal(np.asarray(row["image"]), scene.image)
    assert np.array_equal(np.asarray(row["object_map"]), scene.object_map)
    assert row["patch_object"] == scene.patch_labels(4)["object"].tolist()
    from_row = patch_labels(np.asarray(row["object_map"]), [SceneObject.from_dict(o) for o in row["objects"]], 4)
    assert from_row["glyph"].tolist() == row["patch_glyph"] and from_row["shape"].tolist() == row["patch_shape"]
    assert row["questions"] == ask(scene, FAMILIES, 1)
    for family in FAMILIES:
        tasks = load_from_disk(str(tmp_path / "tb" / "tasks" / family))
        assert set(tasks) == {"validation", "test"}
        assert len(tasks["test"]) == card["splits"]["test"]["families"][family]["questions"] > 0
        assert all(a in ANSWERS[family] for a in tasks["test"]["answer"])
    assert sum(card["splits"]["train"]["families"]["existence"]["answers"].values()) == 10
    assert load_split(tmp_path / "tb", "scenes", "test", limit=2)["seed"] == [2_000_000, 2_000_001]
    assert len(load_split(tmp_path / "tb", "tasks/counting", "test")) == 4  # one counting question per image
    with pytest.raises(FileNotFoundError, match="no tasks/colour under"):
        load_split(tmp_path / "tb", "tasks/colour", "test")
    again = build_splits(tmp_path / "tb2", image_size=48, sizes=sizes, per_family={"train": 2}, progress=False)
    assert again == card  # includes the sha256 of every split's PNG bytes
    with pytest.raises(ValueError, match="exists"):
        build_splits(tmp_path / "tb", image_size=48, sizes=sizes, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 50}, "image_size=50 is not a multiple of patch_size=4"),
    ({"image_size": 40}, "image_size=40 is too small .* use >= 48"),
    ({"families": ["colour"]}, "unknown question family 'colour'"),
    ({"sizes": {"train": -1}}, "size of split 'train' must be >= 0, got"),
    ({"sizes": {"train": 0, "validation": 0, "test": 0}}, "every split is empty"),
    ({"sizes": {"dev": 3}}, "unknown split"),
    ({"per_family": {"test": 0}}, r"per_family\['test'\]"),
    ({"seed": -2}, "seed must be >= 0, got seed=-2"),
    ({"min_coverage": 0}, "min_coverage"),
])
def test_bad_config_names_the_value(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_splits(tmp_path / "never", **kwargs)
    assert not (tmp_path / "never").exists()


def test_unknown_names_raise():
    scene = generate_scene(0)
    with pytest.raises(ValueError, match="'shape'"):
        ask(scene, ["attribute", "shape"])
    with pytest.raises(ValueError, match="patch_size=5"):
        scene.patch_labels(5)
    assert set(SHAPES) == {o for o in ANSWERS["attribute"] if o not in COLOURS}
