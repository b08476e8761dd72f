"""What the demo's stages hand on to the later ones, typed (not a shared dict)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raybooth.jobs.train.handoff import TrainingSummary


@dataclass
class DemoState:
    base_model: str = "toy"
    inpainting_model: str = "toy-inpainting"
    train_config: Path = Path("configs/train/toy.yaml")
    trained: TrainingSummary | None = None  # the training stage's summary
    champion_uri: str | None = None  # set by the MLflow stage when it promoted the version
