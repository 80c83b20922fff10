"""Seeded procedural images of coloured shapes, with captions: the training data of `shapes`.

A scene is one object ("a small red circle on the left on a white background") or two objects in a
relation ("a small red circle left of a large blue square on a yellow background"). Everything is
drawn with PIL at 4x resolution and downsampled, so edges are antialiased. The same seed always
gives the same images and captions.

Single-object prompts are split by a fixed hash into training and held-out sets: training draws
only the training combinations, evaluation (`held_out_scenes`) only the held-out ones, so no
evaluation prompt is ever seen verbatim in training.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64  # pixels, square
_SUPERSAMPLE = 4  # drawn at 4x and downsampled, for antialiased edges

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = {  # object colours (RGB)
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 230),
    "yellow": (240, 215, 30),
    "purple": (140, 40, 180),
    "orange": (245, 135, 20),
}
BACKGROUNDS = {  # background colours (RGB); an object never shares its background's colour
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "yellow": COLOURS["yellow"],
    "blue": COLOURS["blue"],
    "green": COLOURS["green"],
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "right of", "above", "below")

# Caption phrase for each position of a single object.
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Object extent (pixels, bounding box side) per size: single-object scenes, two-object scenes.
_EXTENT_SINGLE = {"small": 18, "large": 34}
_EXTENT_PAIR = {"small": 15, "large": 25}
# Object centre per position, as fractions of the image side (x, y).
_CENTRES = {
    "left": (0.30, 0.5),
    "right": (0.70, 0.5),
    "top": (0.5, 0.30),
    "bottom": (0.5, 0.70),
    "center": (0.5, 0.5),
}
_JITTER = 2  # pixels of random offset of each object centre
HELD_OUT_PERCENT = 10  # share of single-object combinations kept out of training


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One drawn object. `position` is where it sits in the image (for a pair: its half)."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    position: str  # one of POSITIONS


@dataclasses.dataclass(frozen=True)
class Scene:
    """One image: one object, or two related by `relation` (objects[0] <relation> objects[1])."""

    objects: tuple[ShapeObject, ...]
    background: str  # one of BACKGROUNDS
    relation: str | None = None  # one of RELATIONS for two objects, else None


# --- captions -------------------------------------------------------------------------------


def _object_phrase(obj: ShapeObject, with_size: bool = True) -> str:
    size = f"{obj.size} " if with_size else ""
    return f"a {size}{obj.colour} {obj.shape}"


def caption(scene: Scene, drop: frozenset[str] = frozenset()) -> str:
    """The caption of `scene`; `drop` may name "size", "position", "background" to leave out.

    >>> caption(Scene((ShapeObject("circle", "red", "small", "left"),), "white"))
    'a small red circle on the left on a white background'
    """
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        words = [_object_phrase(obj, "size" not in drop)]
        if "position" not in drop:
            words.append(POSITION_PHRASES[obj.position])
    else:
        first, second = scene.objects
        words = [
            _object_phrase(first, "size" not in drop),
            scene.relation,
            _object_phrase(second, "size" not in drop),
        ]
    if "background" not in drop:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


def caption_vocabulary() -> list[str]:
    """Every word any caption can contain, sorted (the tokenizer's whole-word vocabulary)."""
    phrases = [*SHAPES, *COLOURS, *BACKGROUNDS, *SIZES, *RELATIONS, *POSITION_PHRASES.values()]
    words = {"a", "on", "background"}
    for phrase in phrases:
        words.update(phrase.split())
    return sorted(words)


# --- held-out split -------------------------------------------------------------------------


def is_held_out(scene: Scene) -> bool:
    """Whether a single-object scene's full caption belongs to the evaluation set."""
    if len(scene.objects) != 1:
        return False
    return zlib.crc32(caption(scene).encode()) % 100 < HELD_OUT_PERCENT


def all_single_scenes() -> list[Scene]:
    """Every single-object combination of shape, colour, size, position and background."""
    scenes = []
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                for position in POSITIONS:
                    for background in BACKGROUNDS:
                        if background != colour:
                            obj = ShapeObject(shape, colour, size, position)
                            scenes.append(Scene((obj,), background))
    return scenes


def held_out_scenes() -> list[Scene]:
    """The single-object scenes never drawn for training, in a fixed order."""
    return [scene for scene in all_single_scenes() if is_held_out(scene)]


# --- sampling scenes ------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[rng.integers(len(options))]


def sample_single_scene(rng: np.random.Generator) -> Scene:
    """A random single-object training scene (never a held-out one)."""
    while True:
        colour = _pick(rng, COLOURS)
        obj = ShapeObject(_pick(rng, SHAPES), colour, _pick(rng, SIZES), _pick(rng, POSITIONS))
        scene = Scene((obj,), _pick(rng, [b for b in BACKGROUNDS if b != colour]))
        if not is_held_out(scene):
            return scene


def sample_pair_scene(rng: np.random.Generator) -> Scene:
    """A random two-object scene; the objects differ in colour and neither matches the background."""
    relation = _pick(rng, RELATIONS)
    # Where objects[0] and objects[1] sit for each relation.
    positions = {
        "left of": ("left", "right"),
        "right of": ("right", "left"),
        "above": ("top", "bottom"),
        "below": ("bottom", "top"),
    }[relation]
    first_colour = _pick(rng, COLOURS)
    second_colour = _pick(rng, [c for c in COLOURS if c != first_colour])
    background = _pick(rng, [b for b in BACKGROUNDS if b not in (first_colour, second_colour)])
    objects = tuple(
        ShapeObject(_pick(rng, SHAPES), colour, _pick(rng, SIZES), position)
        for colour, position in zip((first_colour, second_colour), positions)
    )
    return Scene(objects, background, relation)


def sample_scene(rng: np.random.Generator, pair_fraction: float = 0.2) -> Scene:
    """A random training scene: two objects with probability `pair_fraction`, else one."""
    if rng.random() < pair_fraction:
        return sample_pair_scene(rng)
    return sample_single_scene(rng)


# --- drawing --------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) inside a box of half-side r."""
    if shape == "square":
        s = 0.85 * r  # a square looks bigger than a circle of the same box; shrink it a little
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":  # pointing up, base at the bottom of the box
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "cross":  # a plus sign with arms a third of the box wide
        a = r / 3
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if shape == "star":  # five points, fat inner radius so it stays a star when small
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.5 * r)
        return [(cx + q * np.cos(t), cy - q * np.sin(t)) for q, t in zip(radii, angles)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _object_centre(obj: ShapeObject, pair: bool) -> tuple[float, float]:
    if pair:  # each object in the middle of its half of the image
        fx, fy = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}[
            obj.position
        ]
    else:
        fx, fy = _CENTRES[obj.position]
    return fx * IMAGE_SIZE, fy * IMAGE_SIZE


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw `scene` as a uint8 array (IMAGE_SIZE, IMAGE_SIZE, 3); `rng` jitters the object centres."""
    k = _SUPERSAMPLE
    image = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    pair = len(scene.objects) == 2
    for obj in scene.objects:
        cx, cy = _object_centre(obj, pair)
        cx += rng.uniform(-_JITTER, _JITTER)
        cy += rng.uniform(-_JITTER, _JITTER)
        r = (_EXTENT_PAIR if pair else _EXTENT_SINGLE)[obj.size] / 2
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=colour)
        else:
            draw.polygon([(x * k, y * k) for x, y in _shape_polygon(obj.shape, cx, cy, r)], fill=colour)
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def generate(
    count: int,
    seed: int,
    pair_fraction: float = 0.2,
    caption_drop: float = 0.0,
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`count` training scenes from `seed`: images (count, 64, 64, 3) uint8, captions, scenes.

    `caption_drop` is the probability of leaving each of size, position and background out of a
    caption (the image still shows them), so the model also follows shorter prompts.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions, scenes = [], []
    for i in range(count):
        scene = sample_scene(rng, pair_fraction)
        drop = frozenset(part for part in ("size", "position", "background") if rng.random() < caption_drop)
        if len(scene.objects) == 2:
            drop -= {"position"}  # a pair's relation is always named
        images[i] = render(scene, rng)
        captions.append(caption(scene, drop))
        scenes.append(scene)
    return images, captions, scenes


def render_scenes(scenes: list[Scene], seed: int) -> np.ndarray:
    """Draw given scenes (e.g. `held_out_scenes()`) as uint8 (N, 64, 64, 3), jitter seeded."""
    rng = np.random.default_rng(seed)
    return np.stack([render(scene, rng) for scene in scenes])


def single_object_view(image: np.ndarray, scene: Scene, index: int) -> np.ndarray:
    """`image` with everything outside object `index`'s half painted over with the background.

    Lets the single-object classifier judge each object of a two-object image separately. The
    background colour is estimated from the image border, so this works on generated images too.
    """
    half = IMAGE_SIZE // 2
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0).astype(image.dtype)  # (3,)
    view = image.copy()
    position = scene.objects[index].position
    if position == "left":
        view[:, half:] = background
    elif position == "right":
        view[:, :half] = background
    elif position == "top":
        view[half:] = background
    elif position == "bottom":
        view[:half] = background
    else:
        raise ValueError(f"object {index} of a pair has position {position!r}; expected a half")
    return view
