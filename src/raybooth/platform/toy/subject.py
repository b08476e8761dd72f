"""The toy DreamBooth subject: something the caption grammar cannot express.

A circle split down the middle into two colours (red on the left, blue on the right). No caption
`a {colour} {shape} …` describes it, so a base model cannot draw it from words; after DreamBooth
on a few instance images, `a sks circle on a {colour} background` should. The judge scores how
much of an image's object follows the split pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from raybooth.platform.toy.judge import PALETTE_NAMES, _majority, border_labels, classify_pixels
from raybooth.platform.toy.world import COLOURS, RESOLUTION, shape_mask

IDENTIFIER = "sks"
SUBJECT_DIR = Path("examples/toy-subject")


@dataclass(frozen=True)
class SplitSubject:
    left: str = "red"
    right: str = "blue"
    shape: str = "circle"

    def backgrounds(self) -> list[str]:
        return [c for c in COLOURS if c not in (self.left, self.right)]

    def instance_prompt(self, background: str | None = None) -> str:
        base = f"a {IDENTIFIER} {self.shape}"
        return f"{base} on a {background} background" if background else base

    def class_prompt(self) -> str:
        return f"a {self.shape}"


SUBJECT = SplitSubject()


def render_subject(subject: SplitSubject, background: str, size: float,
                   resolution: int = RESOLUTION) -> Image.Image:
    mask = shape_mask(subject.shape, size, resolution)
    left = np.zeros_like(mask)
    left[:, : resolution // 2] = True
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[:] = COLOURS[background]
    img[mask & left] = COLOURS[subject.left]
    img[mask & ~left] = COLOURS[subject.right]
    return Image.fromarray(img)


def write_instance_images(out: str | Path = SUBJECT_DIR, subject: SplitSubject = SUBJECT,
                          n: int = 5, seed: int = 0) -> list[Path]:
    """`n` instance images on varied backgrounds and sizes (deterministic by `seed`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    backgrounds = subject.backgrounds()
    paths = []
    for i in range(n):
        bg = backgrounds[i % len(backgrounds)]
        path = out / f"{i:02d}-{bg}.png"
        render_subject(subject, bg, float(rng.uniform(0.5, 0.75))).save(path)
        paths.append(path)
    return paths


def subject_score(image: Image.Image | np.ndarray, subject: SplitSubject = SUBJECT) -> float:
    """How well the object follows the split pattern, in [0, 1]: the smaller of the share of the
    object's left half in the left colour and of its right half in the right colour. A plain
    one-coloured circle scores 0 even in one of the two colours; the subject scores ~1."""
    labels = classify_pixels(image)
    bg = _majority(border_labels(labels))
    obj = labels != bg
    if obj.sum() < 0.02 * obj.size:
        return 0.0
    cols = np.nonzero(obj)[1]
    centre = (cols.min() + cols.max() + 1) / 2
    xx = np.arange(labels.shape[1])[None, :].repeat(labels.shape[0], 0)
    left, right = obj & (xx + 0.5 < centre), obj & (xx + 0.5 > centre)
    if not left.any() or not right.any():
        return 0.0
    li, ri = PALETTE_NAMES.index(subject.left), PALETTE_NAMES.index(subject.right)
    return float(min((labels[left] == li).mean(), (labels[right] == ri).mean()))


def is_subject(image: Image.Image | np.ndarray, subject: SplitSubject = SUBJECT,
               threshold: float = 0.6) -> bool:
    return subject_score(image, subject) >= threshold
