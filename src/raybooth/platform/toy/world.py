"""The toy world's procedural generator: one flat-coloured shape, centred, on a plain background.

Every image is a pure function of its `Scene` (and every random scene of a seed), so the judge can
be exact on the generator's own images and a training run is reproducible. Shapes are drawn by
supersampling a pixel-centre test and taking the majority at each pixel, which keeps the image
flat: every pixel is exactly the background colour or the object colour, no blended edge colours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Saturated, well separated colours: the judge classifies pixels to the nearest of these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 65, 225),
    "yellow": (240, 220, 35),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RESOLUTION = 32
# Object size as a fraction of the image side (the shape's bounding box side).
MIN_SIZE, MAX_SIZE = 0.42, 0.75
CAPTION = "a {colour} {shape} on a {background} background"


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: float = 0.6  # bounding-box side as a fraction of the image side

    def caption(self) -> str:
        return CAPTION.format(colour=self.colour, shape=self.shape, background=self.background)

    def partial_caption(self, keep_colour: bool, keep_background: bool) -> str:
        """The caption with the object colour and/or the background left out (`a circle`,
        `a red circle`, `a circle on a blue background`): DreamBooth's class prompt `a {shape}`
        and inpainting's `a {colour} {shape}` are then prompts the model has seen."""
        text = f"a {self.colour} {self.shape}" if keep_colour else f"a {self.shape}"
        return f"{text} on a {self.background} background" if keep_background else text


def shape_mask(shape: str, size: float, resolution: int = RESOLUTION, supersample: int = 4) -> np.ndarray:
    """Boolean (H, W) mask of `shape` centred in the image, bounding-box side `size` × resolution."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    n = resolution * supersample
    # Sample positions in image units (0..resolution), centre of each sub-pixel.
    coords = (np.arange(n) + 0.5) / supersample
    y, x = np.meshgrid(coords, coords, indexing="ij")
    c = resolution / 2
    half = size * resolution / 2
    if shape == "circle":
        inside = (x - c) ** 2 + (y - c) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - c) <= half) & (np.abs(y - c) <= half)
    else:  # isosceles triangle pointing up, bounding box centred
        top = c - half  # the base is at c + half
        t = (y - top) / (2 * half)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(x - c) <= t * half)
    counts = inside.reshape(resolution, supersample, resolution, supersample).sum(axis=(1, 3))
    return counts * 2 > supersample * supersample


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """The scene as an RGB image."""
    mask = shape_mask(scene.shape, scene.size, resolution)
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[:] = COLOURS[scene.background]
    img[mask] = COLOURS[scene.colour]
    return Image.fromarray(img)


def random_scene(rng: np.random.Generator) -> Scene:
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    background = [n for n in names if n != colour][rng.integers(len(names) - 1)]
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    return Scene(colour=colour, shape=shape, background=background, size=size)


def random_scenes(seed: int, n: int) -> list[Scene]:
    """`n` scenes, a pure function of `seed`."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


def render_batch(scenes: list[Scene], resolution: int = RESOLUTION) -> np.ndarray:
    """(N, H, W, 3) uint8 array of the scenes."""
    return np.stack([np.asarray(render(s, resolution)) for s in scenes])
