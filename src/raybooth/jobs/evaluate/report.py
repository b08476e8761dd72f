"""`evaluation.json`: what an evaluation hands on (to the CLI, MLflow, Tune, a reader).

A typed object with `to_json`/`from_json`. Metrics are `Estimate`s (mean and 95% bootstrap
interval); per-prompt and per-image values let a reader see *which* prompts fail; the baseline is
the real-vs-real row; encoders carry the revisions that produced the numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raybooth.jobs.evaluate.metrics import Estimate

REPORT_FILE = "evaluation.json"
GRID_FILE = "grid.png"
IMAGES_DIR = "images"
REPORT_FORMAT = 1
# The metric names, as MLflow keys too (`eval/dino`, ...).
DINO, CLIP_I, CLIP_T = "dino", "clip_i", "clip_t"
PAPER_METRICS = (DINO, CLIP_I, CLIP_T)


@dataclass
class ImageRecord:
    """One generated image and its three scores."""

    index: int
    prompt_index: int
    prompt: str
    class_prompt: str
    category: str
    seed: int
    file: str  # relative to the report's folder
    dino: float
    clip_i: float
    clip_t: float
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the toy judge's reading


@dataclass
class PromptResult:
    prompt: str
    class_prompt: str
    category: str
    values: dict[str, float]  # metric -> mean over this prompt's images
    files: list[str]


@dataclass
class EvaluationReport:
    model: dict[str, Any]
    encoders: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    metrics: dict[str, Estimate]
    baseline: dict[str, Estimate]
    per_prompt: list[PromptResult]
    per_category: dict[str, dict[str, float]]
    images: list[ImageRecord]
    real_images: list[str]
    counts: dict[str, int]
    timings: dict[str, float]
    execution: dict[str, Any]
    files: dict[str, str] = field(default_factory=lambda: {"grid": GRID_FILE, "images": IMAGES_DIR})
    format: int = REPORT_FORMAT

    def means(self) -> dict[str, float]:
        return {name: est.mean for name, est in self.metrics.items()}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["metrics"] = {k: v.to_json() for k, v in self.metrics.items()}
        data["baseline"] = {k: v.to_json() for k, v in self.baseline.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvaluationReport":
        data = dict(data)
        data["metrics"] = {k: Estimate.from_json(v) for k, v in data["metrics"].items()}
        data["baseline"] = {k: Estimate.from_json(v) for k, v in data["baseline"].items()}
        data["per_prompt"] = [PromptResult(**p) for p in data["per_prompt"]]
        data["images"] = [ImageRecord(**r) for r in data["images"]]
        return cls(**data)

    @classmethod
    def read(cls, path: str | Path) -> "EvaluationReport":
        return cls.from_json(json.loads(Path(path).read_text()))
