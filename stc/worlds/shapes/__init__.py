"""The shapes world: coloured shapes on a plain background, drawn procedurally from a seed.

Everything the world is made of lives here and is deterministic: the palette, the shapes, a
scene sampler, the Pillow renderer (drawn at 4x and downsampled, so edges are anti-aliased), the
captions, and a *checker* that reads a rendered or generated image back into (shape, colour,
background) with plain pixel statistics. The checker is what the quality benchmark and the
tests measure with; on the world's own images it is exact (tested).

One combination is **held out** of the world's training data: a yellow triangle. No caption
the models were trained on ever names it and no training image shows it, which makes it the
example concept (``examples/wedge/``): something the world can draw but has no words for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

RESOLUTION = 32
SUPERSAMPLE = 4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "green": (60, 170, 70),
    "blue": (45, 85, 220),
    "yellow": (240, 210, 50),
    "purple": (150, 60, 190),
    "white": (240, 240, 240),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
HELD_OUT = ("yellow", "triangle")  # (colour, shape) never in the world's training data
MIN_SIZE, MAX_SIZE = 12, 24  # side of the shape's bounding box, px at RESOLUTION

# Caption words beyond the templates' (stc.method.templates.OBJECT_TEMPLATES); the tokenizer knows
# every one as a single token.
WORLD_WORDS = ("circle", "square", "triangle", "background", "shape") + COLOURS


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: int  # bounding-box side, px at RESOLUTION
    x: int  # top-left corner of the bounding box, px at RESOLUTION
    y: int

    def render(self, resolution: int = RESOLUTION):
        """The scene as an RGB PIL image (``resolution`` px square)."""
        from PIL import Image, ImageDraw

        scale = SUPERSAMPLE * resolution / RESOLUTION
        big = round(resolution * SUPERSAMPLE)
        image = Image.new("RGB", (big, big), PALETTE[self.background])
        draw = ImageDraw.Draw(image)
        x0, y0 = self.x * scale, self.y * scale
        x1, y1 = (self.x + self.size) * scale - 1, (self.y + self.size) * scale - 1
        fill = PALETTE[self.colour]
        if self.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif self.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # upright isosceles triangle filling half its bounding box
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        return image.resize((resolution, resolution), Image.Resampling.BOX)


def sample_scene(rng: random.Random, *, shape: str | None = None, colour: str | None = None,
                 background: str | None = None, allow_held_out: bool = False) -> Scene:
    """A random scene; the given attributes are fixed. Shape and background colours differ, and
    the held-out combination is drawn only with ``allow_held_out``."""
    while True:
        s = shape or rng.choice(SHAPES)
        c = colour or rng.choice(COLOURS)
        b = background or rng.choice(COLOURS)
        if c == b or ((c, s) == HELD_OUT and not allow_held_out):
            if shape and colour and background:
                raise ValueError(f"no scene has a {c} {s} on a {b} background" if c == b else
                                 f"a {c} {s} is held out of the world")
            continue
        size = rng.randint(MIN_SIZE, MAX_SIZE)
        x = rng.randint(1, RESOLUTION - 1 - size)
        y = rng.randint(1, RESOLUTION - 1 - size)
        return Scene(s, c, b, size, x, y)


def scenes(seed: int, count: int) -> list[Scene]:
    """``count`` training scenes of the world, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(count)]


def caption(scene: Scene, rng: random.Random, templates: list[str] | None = None) -> str:
    """A caption for ``scene``: usually colour, shape and background; sometimes without the
    colour or the background (so each word is learned on its own), in a plain form or one of
    the concept-training templates (so their words are not noise to the world)."""
    if templates is None:
        from ...method.templates import OBJECT_TEMPLATES as templates
    draw = rng.random()
    colour = draw < 0.85  # 15 % without the colour
    background = not (0.7 <= draw < 0.85)  # 15 % without the background
    noun = f"{scene.colour} {scene.shape}" if colour else scene.shape
    text = rng.choice(templates).format(noun) if rng.random() < 0.5 else f"a {noun}"
    if background:
        text += f" on a {scene.background} background"
    return text


def nearest_colour(rgb) -> str:
    """The palette colour nearest to ``rgb`` (Euclidean in RGB)."""
    r, g, b = (float(v) for v in rgb)
    return min(COLOURS, key=lambda name: (PALETTE[name][0] - r) ** 2 + (PALETTE[name][1] - g) ** 2
               + (PALETTE[name][2] - b) ** 2)


@dataclass(frozen=True)
class Reading:
    """What the checker reads in an image. ``background`` is None when the border is not one
    colour; ``shape``/``colour`` are None when no clean single shape is found (``why`` says why)."""

    background: str | None
    colour: str | None
    shape: str | None
    fill: float = 0.0  # shape pixels / bounding-box area
    pixels: int = 0  # shape pixels
    why: str = ""


def read_image(image) -> Reading:
    """Read (background, shape colour, shape) back from an image of the world, by pixels alone.

    - background: the palette colour nearest to the median of the border pixels, if at least
      80 % of the border pixels are nearest to it;
    - shape pixels: those nearer to some other palette colour than to the background's, and at
      least 60 (of 441) away from it in RGB;
    - a shape is read only if it is clean: 40-700 pixels, a roughly square bounding box of a
      plausible side (9-27 px at 32 px), 80 % of its pixels nearest to one colour, and 90 % of
      the pixels outside its bounding box nearest to the background;
    - colour: the palette colour nearest to the median of the shape pixels;
    - shape: from how much of its bounding box the shape fills (square 1.0, circle pi/4,
      triangle 1/2): above 0.9 a square, above 0.65 a circle, else a triangle.

    Exact on the world's own images (tested); noise and smears read as no shape.
    """
    import numpy as np

    array = np.asarray(image.convert("RGB").resize((RESOLUTION, RESOLUTION)), dtype=np.float32)
    palette = np.array([PALETTE[name] for name in COLOURS], dtype=np.float32)
    nearest = np.linalg.norm(array[:, :, None, :] - palette[None, None], axis=-1).argmin(axis=-1)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    border_nearest = np.concatenate([nearest[0], nearest[-1], nearest[:, 0], nearest[:, -1]])
    bg_name = nearest_colour(np.median(border, axis=0))
    bg_index = COLOURS.index(bg_name)
    background = bg_name if (border_nearest == bg_index).mean() >= 0.8 else None
    away = np.linalg.norm(array - palette[bg_index], axis=-1)
    mask = (nearest != bg_index) & (away >= 60)
    count = int(mask.sum())

    def none(why: str, fill: float = 0.0) -> Reading:
        return Reading(background, None, None, fill, count, why)

    if not 40 <= count <= 700:
        return none(f"{count} shape pixels")
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = count / float(height * width)
    if not (9 <= height <= 27 and 9 <= width <= 27 and 0.75 <= height / width <= 1.33):
        return none(f"bounding box {width}x{height}", fill)
    colour = nearest_colour(np.median(array[mask], axis=0))
    if (nearest[mask] == COLOURS.index(colour)).mean() < 0.8:
        return none("shape of mixed colours", fill)
    outside = np.ones_like(mask)
    outside[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = False
    if (nearest[outside] == bg_index).mean() < 0.9:
        return none("background not plain", fill)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return Reading(background, colour, shape, fill, count)


# The example concept (examples/wedge): the held-out yellow triangle, photographed on every
# background but green, the colour its edits ask for.
CONCEPT_BACKGROUNDS = ("blue", "red", "purple", "white")
EDIT_BACKGROUND = "green"


def concept_scenes(seed: int, count: int) -> list[Scene]:
    """``count`` scenes of the held-out concept at varied sizes and positions, cycling through
    CONCEPT_BACKGROUNDS; reproducible from ``seed``."""
    colour, shape = HELD_OUT
    rng = random.Random(seed)
    return [sample_scene(rng, shape=shape, colour=colour, background=CONCEPT_BACKGROUNDS[i % len(CONCEPT_BACKGROUNDS)],
                         allow_held_out=True) for i in range(count)]
