"""The paper's three numbers, from embeddings (numpy only: no model here).

With unit-normalised embeddings (cosine similarity = dot product):

- DINO  = mean over all (generated g, real r) pairs of cos(dino(g), dino(r));
- CLIP-I = the same with CLIP image embeddings;
- CLIP-T = mean over generated images g of cos(clip_image(g), clip_text(prompt of g without the
  identifier)).

All-pairs means are means over generated images of each image's mean similarity to the real set,
so every metric is a mean of one score per generated image. The 95% interval is a percentile
bootstrap over those per-image scores (resampling generated images; the real set is the subject,
held fixed), with a seeded generator so the same inputs give the same interval.

The real-vs-real baseline (the paper's "Real Images" row) is the mean over pairs of *distinct*
real images (the diagonal, cos = 1, is left out), with its interval bootstrapped over each real
image's mean similarity to the others. With one real image there are no pairs: no baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_BOOTSTRAP = 1000
CONFIDENCE = 0.95


def normalise(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of embedding rows, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos(a_i, b_j) for every row pair."""
    return normalise(a) @ normalise(b).T


def pairwise_scores(generated: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Each generated image's mean cosine to all real images (DINO / CLIP-I per image)."""
    return cosine_matrix(generated, real).mean(axis=1)


def text_scores(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """cos(image_i, text_i) per row (CLIP-T per image)."""
    if len(images) != len(texts):
        raise ValueError("one text embedding per image is needed")
    return np.sum(normalise(images) * normalise(texts), axis=1)


def real_baseline_scores(real: np.ndarray) -> np.ndarray:
    """Each real image's mean cosine to the *other* real images."""
    n = len(real)
    if n < 2:
        return np.zeros(0)
    sim = cosine_matrix(real, real)
    return (sim.sum(axis=1) - np.diag(sim)) / (n - 1)


@dataclass(frozen=True)
class Estimate:
    """A mean and its 95% bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Estimate":
        return cls(**data)


def bootstrap(scores: np.ndarray, *, samples: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Estimate:
    """Mean of `scores` with a percentile bootstrap interval (resampling the scores)."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no scores to estimate from")
    mean = float(x.mean())
    if x.size == 1:
        return Estimate(mean=mean, low=mean, high=mean, n=1)
    rng = np.random.default_rng(np.random.PCG64(seed))
    draws = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Estimate(mean=mean, low=float(low), high=float(high), n=int(x.size))


def dino_score(generated: np.ndarray, real: np.ndarray) -> float:
    return float(pairwise_scores(generated, real).mean())


def clip_i_score(generated: np.ndarray, real: np.ndarray) -> float:
    return float(pairwise_scores(generated, real).mean())


def clip_t_score(images: np.ndarray, texts: np.ndarray) -> float:
    return float(text_scores(images, texts).mean())
