"""The toy world's judge: plain pixel analysis (no learned weights) of one image.

Each pixel is classified to the nearest palette colour. The background is the majority colour of
the border; the object is the majority of the non-background pixels; the shape is read from the
object mask: a triangle pointing up is much narrower at its top than at its base; a square fills
the corners of its bounding box, a circle leaves them empty. On the generator's own
images every step is exact; on a model's images it tolerates noise pixels and soft edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from raybooth.platform.toy.world import COLOURS, SHAPES

PALETTE_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    """What the judge reads in one image (None where there is nothing to read)."""

    background: str
    colour: str | None
    shape: str | None
    object_fraction: float  # share of the image covered by the object colour
    purity: float = 0.0  # share of the non-background pixels in the object colour (1: one colour)

    def ordinary(self) -> bool:
        """A single flat-coloured shape the grammar can describe (not, e.g., a two-coloured one)."""
        return self.colour is not None and self.shape is not None and self.purity >= 0.8

    def to_json(self) -> dict:
        return {"background": self.background, "colour": self.colour, "shape": self.shape,
                "object_fraction": self.object_fraction, "purity": self.purity}


def classify_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W) int array: index into PALETTE_NAMES of each pixel's nearest palette colour."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    dist = ((arr[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return dist.argmin(-1)


def _majority(labels: np.ndarray) -> int:
    return int(np.bincount(labels.ravel(), minlength=len(PALETTE_NAMES)).argmax())


def border_labels(labels: np.ndarray, width: int = 2) -> np.ndarray:
    return np.concatenate([labels[:width].ravel(), labels[-width:].ravel(),
                           labels[:, :width].ravel(), labels[:, -width:].ravel()])


def read_shape(mask: np.ndarray) -> str | None:
    """circle | square | triangle from a boolean object mask, or None if it is too small to read."""
    # Keep rows/columns that hold a real part of the object, not stray pixels.
    rows = np.flatnonzero(mask.sum(1) >= 2)
    cols = np.flatnonzero(mask.sum(0) >= 2)
    if len(rows) < 4 or len(cols) < 4:
        return None
    box = mask[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    widths = box.sum(1).astype(np.float32)
    h = len(widths)
    band = max(1, h // 5)
    top = widths[:band].mean()
    bottom = widths[-band:].mean()
    if top < 0.55 * bottom:
        return "triangle"
    # Square or circle: a square fills the corners of its bounding box, a circle leaves them
    # empty. Corner patches (a fifth of the side) separate the two by a wide margin even for a
    # model's squares with soft corners, which the box's overall fill does not.
    k = max(2, round(0.2 * min(box.shape)))
    corners = np.concatenate([box[:k, :k].ravel(), box[:k, -k:].ravel(),
                              box[-k:, :k].ravel(), box[-k:, -k:].ravel()])
    return "square" if corners.mean() >= 0.5 else "circle"


def judge(image: Image.Image | np.ndarray) -> Reading:
    labels = classify_pixels(image)
    bg = _majority(border_labels(labels))
    inner = labels[labels != bg]
    if inner.size < 0.02 * labels.size:
        return Reading(PALETTE_NAMES[bg], None, None, float(inner.size) / labels.size)
    obj = _majority(inner)
    mask = labels == obj
    return Reading(PALETTE_NAMES[bg], PALETTE_NAMES[obj], read_shape(mask), float(mask.mean()),
                   float(mask.sum() / inner.size))


def colour_inside(image: Image.Image | np.ndarray, mask: np.ndarray) -> str | None:
    """The majority palette colour of the pixels where `mask` is true (for inpainting checks)."""
    labels = classify_pixels(image)[mask]
    return PALETTE_NAMES[_majority(labels)] if labels.size else None


def shape_names() -> tuple[str, ...]:
    return SHAPES
