"""Scores of a model on the toy world, computed by the judge: prompt following and inpainting.

Shared by the trainer (curves), the tests (thresholds) and evaluation. A model is passed as a
function from (prompts, seeds) to images, so the same score runs on an in-memory pipeline
during training and on a `DiffusionRunner` over the shipped weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from raybooth.platform.toy.judge import colour_inside, judge
from raybooth.platform.toy.world import COLOURS, Scene, random_scenes, render, shape_mask

TextToImage = Callable[[list[str], list[int]], list[Image.Image]]
Inpaint = Callable[[list[Image.Image], list[Image.Image], list[str], list[int]], list[Image.Image]]


@dataclass(frozen=True)
class PromptScore:
    background: float
    colour: float
    shape: float
    n: int

    def to_json(self) -> dict:
        return {"background": self.background, "colour": self.colour, "shape": self.shape, "n": self.n}


def score_prompt_following(generate: TextToImage, scenes: list[Scene], seeds: list[int],
                           batch: int = 48) -> PromptScore:
    """Each scene's caption once per seed; the share of images where the judge reads what was asked."""
    jobs = [(s, seed) for seed in seeds for s in scenes]
    hits = np.zeros(3)
    for start in range(0, len(jobs), batch):
        chunk = jobs[start: start + batch]
        images = generate([s.caption() for s, _ in chunk], [seed for _, seed in chunk])
        for (scene, _), image in zip(chunk, images):
            r = judge(image)
            hits += [r.background == scene.background, r.colour == scene.colour, r.shape == scene.shape]
    n = len(jobs)
    return PromptScore(*(float(h / n) for h in hits), n=n)


@dataclass(frozen=True)
class InpaintCase:
    """Repaint the object of `source` as `colour` (its shape kept): mask = the object, dilated."""

    source: Scene
    colour: str

    def prompt(self) -> str:
        return f"a {self.colour} {self.source.shape}"

    def mask(self, resolution: int) -> np.ndarray:
        m = shape_mask(self.source.shape, self.source.size, resolution)
        # Dilate by one pixel so the old object's edge is inside the repainted region.
        d = m.copy()
        d[1:] |= m[:-1]; d[:-1] |= m[1:]; d[:, 1:] |= m[:, :-1]; d[:, :-1] |= m[:, 1:]
        return d


def inpaint_cases(seed: int, n: int) -> list[InpaintCase]:
    rng = np.random.default_rng(seed)
    cases = []
    for scene in random_scenes(seed, n):
        options = [c for c in COLOURS if c not in (scene.colour, scene.background)]
        cases.append(InpaintCase(scene, options[rng.integers(len(options))]))
    return cases


@dataclass(frozen=True)
class InpaintScore:
    colour_inside: float  # share of cases whose mask reads as the asked colour
    unchanged_outside: float  # share of cases with every pixel outside the mask unchanged
    n: int

    def to_json(self) -> dict:
        return {"colour_inside": self.colour_inside, "unchanged_outside": self.unchanged_outside, "n": self.n}


def score_inpainting(inpaint: Inpaint, cases: list[InpaintCase], seeds: list[int],
                     resolution: int, batch: int = 48) -> InpaintScore:
    jobs = [(c, seed) for seed in seeds for c in cases]
    colour_hits = unchanged = 0
    for start in range(0, len(jobs), batch):
        chunk = jobs[start: start + batch]
        sources = [render(c.source, resolution) for c, _ in chunk]
        masks = [c.mask(resolution) for c, _ in chunk]
        mask_images = [Image.fromarray((m * 255).astype(np.uint8)) for m in masks]
        out = inpaint(sources, mask_images, [c.prompt() for c, _ in chunk], [s for _, s in chunk])
        for (case, _), src, m, img in zip(chunk, sources, masks, out):
            colour_hits += colour_inside(img, m) == case.colour
            a, b = np.asarray(src.convert("RGB")), np.asarray(img.convert("RGB"))
            unchanged += bool((a[~m] == b[~m]).all())
    n = len(jobs)
    return InpaintScore(colour_hits / n, unchanged / n, n)
