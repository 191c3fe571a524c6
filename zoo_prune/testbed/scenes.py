"""Synthetic scenes: a cluttered, muted background with a few small saturated shapes and glyph boxes.

A scene is drawn from one integer seed with ``numpy.random.Generator(PCG64(seed))`` (never the
global RNG), so the same seed gives the same pixels. Every drawn object is painted into a
per-pixel object map (0 = background, i + 1 = ``objects[i]``), from which per-patch labels follow.

Layout of every scene (this is what makes the question families balanced):
* a *group* of 0..MAX_GROUP copies of one shape in distinct colours (the counting target);
* 2..3 *single* shapes, each of a shape that occurs once (attribute and relation targets);
* 1..2 *boxes*: a white tile with a coloured frame showing one black digit (reading targets).
Objects do not overlap and keep a gap of a few pixels between them.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from .._checks import check_int

COLOURS = {  # name -> RGB; six hues 60 degrees apart, fully saturated (backgrounds are muted)
    "red": (225, 30, 30),
    "yellow": (235, 215, 20),
    "green": (30, 175, 40),
    "cyan": (20, 200, 215),
    "blue": (35, 65, 230),
    "magenta": (215, 40, 205),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
BOX = "box"  # the shape name of a glyph box
FONT = {  # 3x5 bitmaps, legible at one pixel per cell
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}
GLYPHS = tuple(FONT)
BACKGROUNDS = ("gradient", "radial", "texture", "stripes", "checker", "noise")
CLUTTER = ("blobs", "lines", "speckle")

MAX_GROUP = 4  # group sizes 0..MAX_GROUP, uniform: counting answers 0..MAX_GROUP
SINGLES = (2, 3)  # inclusive range of single shapes
BOXES = (1, 2)  # inclusive range of glyph boxes
SHAPE_SIZE = (0.12, 0.17)  # side of a shape's bounding square, as a fraction of the image side
MIN_SHAPE_PX = 8  # ... but never below this many pixels (two patches of 4)
MAX_FILL = 0.4  # worst-case area of objects plus gaps, as a fraction of the image: random placement fits
COLOUR_JITTER = 18  # +- per channel, per object

# Per-patch label vocabularies: index 0 is "none" (background).
PATCH_COLOURS = ("none", *COLOURS)
PATCH_SHAPES = ("none", *SHAPES, BOX)
PATCH_GLYPHS = ("none", *GLYPHS)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; ``bbox`` = (x0, y0, x1, y1) in pixels, x1 and y1 exclusive."""

    shape: str  # one of SHAPES, or BOX
    colour: str  # one of COLOURS (a box's frame colour)
    glyph: str  # the digit shown in a box, "" for shapes
    bbox: tuple[int, int, int, int]

    def as_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "glyph": self.glyph, "bbox": list(self.bbox)}

    @classmethod
    def from_dict(cls, d: dict) -> "SceneObject":
        return cls(d["shape"], d["colour"], d["glyph"], tuple(d["bbox"]))


@dataclass
class Scene:
    seed: int
    image: np.ndarray  # (S, S, 3) uint8
    object_map: np.ndarray  # (S, S) uint8: 0 background, i + 1 for objects[i]
    objects: list[SceneObject]
    background: str  # e.g. "stripes+blobs"
    group_shape: str  # the shape of the counting group (absent when the group is empty)

    @property
    def image_size(self) -> int:
        return self.image.shape[0]

    def patch_labels(self, patch_size: int = 4, min_coverage: float = 0.25) -> dict[str, np.ndarray]:
        """Per-patch labels in raster (ViT token) order, see :func:`patch_labels`."""
        return patch_labels(self.object_map, self.objects, patch_size, min_coverage)


def check_image_size(image_size: int, patch_size: int | None = None) -> None:
    """Raise ValueError when the image cannot hold a scene or is not a whole number of patches."""
    check_int("image_size", image_size)
    if worst_case_fill(image_size) > MAX_FILL:
        smallest = next(s for s in range(image_size, 10 * image_size) if worst_case_fill(s) <= MAX_FILL)
        raise ValueError(f"image_size={image_size} is too small for up to {max_objects()} objects (they would fill "
                         f"{worst_case_fill(image_size):.0%} of it, limit {MAX_FILL:.0%}); use >= {smallest}")
    if patch_size is not None:
        if image_size % check_int("patch_size", patch_size):
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")


def check_coverage(min_coverage: float) -> None:
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be in (0, 1], got min_coverage={min_coverage}")


def max_objects() -> int:
    return MAX_GROUP + SINGLES[1] + BOXES[1]


def worst_case_fill(image_size: int) -> float:
    """Area of the most and largest objects, each with its gap, over the image's area."""
    gap, (_, side), (w, h) = object_gap(image_size), shape_size_range(image_size), box_size(image_size)
    return ((MAX_GROUP + SINGLES[1]) * (side + gap) ** 2 + BOXES[1] * (w + gap) * (h + gap)) / image_size**2


def glyph_scale(image_size: int) -> int:
    """Pixels per font cell: 1 at 48x48, 2 at 96x96."""
    return max(1, round(image_size / 48))


def shape_size_range(image_size: int) -> tuple[int, int]:
    lo, hi = (max(MIN_SHAPE_PX, round(f * image_size)) for f in SHAPE_SIZE)
    return lo, hi


def box_size(image_size: int) -> tuple[int, int]:
    """(width, height) of a glyph box: glyph + one cell of white margin + one cell of frame per side."""
    g = glyph_scale(image_size)
    return 7 * g, 9 * g


def object_gap(image_size: int) -> int:
    return max(2, image_size // 32)


# ---------------------------------------------------------------- backgrounds


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour, far from the object palette."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.85))
    return np.array(rgb) * 255.0


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a * (1.0 - t[..., None]) + b * t[..., None]


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """(size, size, 3) float image in [0, 255] and its description."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    a, b = _muted_colour(rng), _muted_colour(rng)
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    angle = rng.uniform(0, np.pi)
    along = x * np.cos(angle) + y * np.sin(angle)
    if kind == "gradient":
        image = _mix(a, b, (along - along.min()) / (np.ptp(along) + 1e-9))
    elif kind == "radial":
        cx, cy = rng.uniform(0, 1, 2)
        image = _mix(a, b, np.clip(np.hypot(x - cx, y - cy) / rng.uniform(0.5, 1.2), 0, 1))
    elif kind == "texture":  # smooth value noise: a coarse random grid, bilinearly upsampled
        cells = rng.integers(3, 9)
        grid = rng.random((cells + 1, cells + 1))
        gx, gy = x * cells, y * cells
        ix, iy = gx.astype(int), gy.astype(int)
        fx, fy = gx - ix, gy - iy
        t = (grid[iy, ix] * (1 - fx) * (1 - fy) + grid[iy, ix + 1] * fx * (1 - fy)
             + grid[iy + 1, ix] * (1 - fx) * fy + grid[iy + 1, ix + 1] * fx * fy)
        image = _mix(a, b, t)
    elif kind == "stripes":
        period = rng.uniform(3, 14) / size
        wave = np.sin(2 * np.pi * along / period)
        image = _mix(a, b, (wave > 0).astype(float) if rng.random() < 0.5 else 0.5 + 0.5 * wave)
    elif kind == "checker":
        cell = rng.integers(3, 13) / size
        image = _mix(a, b, ((x // cell + y // cell) % 2).astype(float))
    else:  # noise
        image = a + rng.normal(0, rng.uniform(8, 25), (size, size, 3))
    parts = [kind]
    for overlay in rng.permutation(CLUTTER)[: rng.integers(0, 3)]:
        _clutter(rng, image, overlay, x, y)
        parts.append(str(overlay))
    return np.clip(image, 0, 255), "+".join(parts)


def _clutter(rng: np.random.Generator, image: np.ndarray, kind: str, x: np.ndarray, y: np.ndarray) -> None:
    """Draw irrelevant muted marks into ``image`` in place."""
    size = image.shape[0]
    if kind == "blobs":  # soft ellipses
        for _ in range(rng.integers(3, 9)):
            cx, cy = rng.uniform(0, 1, 2)
            rx, ry = rng.uniform(0.05, 0.25, 2)
            alpha = np.exp(-(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)) * rng.uniform(0.4, 0.9)
            image[:] = _mix(image, _muted_colour(rng), alpha)
    elif kind == "lines":  # thin straight lines across the image
        for _ in range(rng.integers(3, 11)):
            angle, offset = rng.uniform(0, np.pi), rng.uniform(0.1, 0.9)
            distance = np.abs((x - offset) * np.sin(angle) - (y - offset) * np.cos(angle)) * size
            image[distance < rng.uniform(0.4, 1.0)] = _muted_colour(rng)
    else:  # speckle: single dots
        n = rng.integers(size, 4 * size)
        image[rng.integers(0, size, n), rng.integers(0, size, n)] = _muted_colour(rng)


# ---------------------------------------------------------------- objects


def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool mask of a shape filling its bounding square."""
    y, x = (np.mgrid[0:side, 0:side] + 0.5) - side / 2  # pixel centres relative to the centre
    r = side / 2
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "square":
        return (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    if shape == "triangle":  # apex up
        return (y <= r) & (np.abs(x) <= (y + r) / 2)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= r
    if shape == "cross":
        arm = side / 6
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def glyph_tile(glyph: str, image_size: int) -> np.ndarray:
    """(h, w) uint8 tile of a glyph box: 0 = frame, 1 = white margin, 2 = black ink."""
    if glyph not in FONT:
        raise ValueError(f"unknown glyph {glyph!r}; choose one of {GLYPHS}")
    bitmap = np.array([[c == "1" for c in row] for row in FONT[glyph]], dtype=np.uint8)  # (5, 3)
    tile = np.ones((9, 7), dtype=np.uint8)
    tile[[0, -1], :] = tile[:, [0, -1]] = 0
    tile[2:7, 2:5] += bitmap
    g = glyph_scale(image_size)
    return tile.repeat(g, 0).repeat(g, 1)


def _place(rng: np.random.Generator, sizes: list[tuple[int, int]], image_size: int) -> list[tuple[int, int, int, int]]:
    """Random non-overlapping boxes of the given (w, h), kept ``gap`` pixels apart and from the border."""
    gap = object_gap(image_size)
    for _ in range(50):  # restart the whole layout if one object finds no room
        boxes: list[tuple[int, int, int, int]] = []
        for w, h in sizes:
            for _ in range(100):
                x0 = int(rng.integers(gap, image_size - gap - w + 1))
                y0 = int(rng.integers(gap, image_size - gap - h + 1))
                box = (x0, y0, x0 + w, y0 + h)
                if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap or b[1] >= box[3] + gap
                       for b in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(sizes):
            return boxes
    raise RuntimeError(f"could not place {len(sizes)} objects in a {image_size}x{image_size} image")


def _layout(rng: np.random.Generator) -> tuple[str, list[tuple[str, str, str]]]:
    """The group shape and the (shape, colour, glyph) of every object: group, singles, boxes."""
    colours = list(COLOURS)
    shapes = [str(s) for s in rng.permutation(SHAPES)]
    group_shape, single_shapes = shapes[0], shapes[1 : 1 + rng.integers(SINGLES[0], SINGLES[1] + 1)]
    group = [(group_shape, str(c), "") for c in rng.choice(colours, rng.integers(0, MAX_GROUP + 1), replace=False)]
    singles = [(s, colours[rng.integers(len(colours))], "") for s in single_shapes]
    n_boxes = rng.integers(BOXES[0], BOXES[1] + 1)
    boxes = [(BOX, str(c), str(g)) for c, g in zip(rng.choice(colours, n_boxes, replace=False),
                                                     rng.choice(GLYPHS, n_boxes, replace=False))]
    return group_shape, group + singles + boxes


def generate_scene(seed: int, image_size: int = 96) -> Scene:
    """Draw the scene of ``seed``: same seed and size, same pixels."""
    check_image_size(image_size)
    check_int("seed", seed, minimum=0)
    rng = np.random.Generator(np.random.PCG64(seed))
    image, background = _background(rng, image_size)
    group_shape, specs = _layout(rng)
    lo, hi = shape_size_range(image_size)
    sizes = [box_size(image_size) if shape == BOX else (side := int(rng.integers(lo, hi + 1)), side)
             for shape, _, _ in specs]
    bboxes = _place(rng, sizes, image_size)

    object_map = np.zeros((image_size, image_size), dtype=np.uint8)
    objects = []
    for i, ((shape, colour, glyph), (x0, y0, x1, y1)) in enumerate(zip(specs, bboxes)):
        rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
        region, ids = image[y0:y1, x0:x1], object_map[y0:y1, x0:x1]
        if shape == BOX:
            tile = glyph_tile(glyph, image_size)
            region[:] = np.select([tile[..., None] == 0, tile[..., None] == 1], [rgb, 245.0], 15.0)
            ids[:] = i + 1
        else:
            mask = shape_mask(shape, x1 - x0)
            region[mask] = rgb
            ids[mask] = i + 1
        objects.append(SceneObject(shape, colour, glyph, (x0, y0, x1, y1)))
    return Scene(seed, np.round(image).astype(np.uint8), object_map, objects, background, group_shape)


# ---------------------------------------------------------------- per-patch labels


def patch_labels(object_map: np.ndarray, objects: list[SceneObject], patch_size: int = 4,
                 min_coverage: float = 0.25) -> dict[str, np.ndarray]:
    """Labels of each patch, flattened in raster order (the ViT token order), each (N,) int64.

    A patch belongs to the object covering most of its pixels if that object covers at least
    ``min_coverage`` of them, else to the background. ``object``: 0 or i + 1 for ``objects[i]``;
    ``colour`` / ``shape`` / ``glyph``: indices into PATCH_COLOURS / PATCH_SHAPES / PATCH_GLYPHS
    (0 = "none"); ``coverage``: the fraction of the patch the labelled object covers (0..1).
    """
    check_image_size(object_map.shape[0], patch_size)
    check_coverage(min_coverage)
    grid = object_map.shape[0] // patch_size
    blocks = object_map.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = (blocks[:, :, None] == np.arange(1, len(objects) + 1)).sum(1)  # (N, n_objects)
    best = counts.argmax(1) if objects else np.zeros(len(blocks), dtype=int)
    coverage = counts.max(1) / blocks.shape[1] if objects else np.zeros(len(blocks))
    covered = coverage >= min_coverage
    table = np.array([[0, 0, 0, 0]] + [[i + 1, PATCH_COLOURS.index(o.colour), PATCH_SHAPES.index(o.shape),
                                        PATCH_GLYPHS.index(o.glyph) if o.glyph else 0] for i, o in enumerate(objects)])
    rows = table[np.where(covered, best + 1, 0)]
    labels = dict(zip(("object", "colour", "shape", "glyph"), rows.T.astype(np.int64)))
    labels["coverage"] = np.where(covered, coverage, 0.0)
    return labels
