"""What crosses a boundary in the training job, as typed objects with `to_json` / `from_json`:

- `WorkerJob`        driver -> every Ray Train worker (the `train_loop_config`)
- `Export`           export -> driver: the trained model folder (full pipeline or LoRA adapter)
- `TrainingSummary`  driver -> summary.json -> registration, the demo, Tune, Serve

Readers use attributes; a field that is missing in the JSON is an error, not a guess.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raybooth.platform.config import TrainConfig
from raybooth.platform.mlflow.registry import Registration
from raybooth.platform.paths import write_json_atomic

Mode = Literal["full", "lora"]


def _path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def _str(value: Path | None) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker needs, and nothing it would have to find on the driver's disk."""

    config: TrainConfig  # validated; a local model directory already made absolute
    run_dir: Path
    # The few instance photos travel with the job (name -> bytes), so no node needs the
    # driver's folder.
    instance_images: dict[str, bytes]
    class_images: list[Path] | None  # None: no prior preservation
    resume_path: Path | None = None  # a checkpoint named by run.resume_from
    mlflow_run_id: str | None = None  # the driver's run; None: no tracking
    mlflow_tracking_uri: str | None = None

    @property
    def with_prior(self) -> bool:
        return self.class_images is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "run_dir": str(self.run_dir),
            "instance_images": {k: base64.b64encode(v).decode("ascii") for k, v in self.instance_images.items()},
            "class_images": None if self.class_images is None else [str(p) for p in self.class_images],
            "resume_path": _str(self.resume_path),
            "mlflow_run_id": self.mlflow_run_id,
            "mlflow_tracking_uri": self.mlflow_tracking_uri,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerJob:
        return cls(
            config=TrainConfig.model_validate(data["config"]),
            run_dir=Path(data["run_dir"]),
            instance_images={k: base64.b64decode(v) for k, v in data["instance_images"].items()},
            class_images=None if data["class_images"] is None else [Path(p) for p in data["class_images"]],
            resume_path=_path(data["resume_path"]),
            mlflow_run_id=data["mlflow_run_id"],
            mlflow_tracking_uri=data["mlflow_tracking_uri"],
        )


@dataclass(frozen=True)
class Export:
    """A trained model on disk: a diffusers pipeline folder (full) or a LoRA adapter folder (lora)
    whose base is `base_model` at `base_revision`."""

    mode: Mode
    path: Path
    step: int
    base_model: str
    base_revision: str | None = None

    @property
    def lora_path(self) -> Path | None:
        return self.path if self.mode == "lora" else None

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "path": str(self.path), "step": self.step,
                "base_model": self.base_model, "base_revision": self.base_revision}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Export:
        return cls(mode=data["mode"], path=Path(data["path"]), step=int(data["step"]),
                   base_model=data["base_model"], base_revision=data["base_revision"])


@dataclass(frozen=True)
class TrainingSummary:
    """summary.json: what one training run produced and where to find it."""

    run_dir: Path
    export: Export
    final_loss: float | None
    final_metrics: dict[str, float]  # the last step's metrics, from the run directory's own log
    checkpoint: Path  # the checkpoint that was exported
    resumed_from: Path | None
    num_workers: int
    class_image_set: str | None  # identity of the class-image set (None: no prior preservation)
    class_images_dir: Path | None
    validation_images: list[Path]
    mlflow_run_id: str | None
    registration: Registration | None  # None: not registered (tracking off, or no register_as)
    train_seconds: float
    total_seconds: float | None = None

    # The questions readers ask most, answered once.
    @property
    def mode(self) -> Mode:
        return self.export.mode

    @property
    def steps(self) -> int:
        return self.export.step

    @property
    def model_path(self) -> Path:
        return self.export.path

    @property
    def lora_path(self) -> Path | None:
        return self.export.lora_path

    @property
    def model_uri(self) -> str | None:
        """`models:/NAME@ALIAS` when registered, else None."""
        return self.registration.model_uri if self.registration and self.registration.registered_model else None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "export": self.export.to_json(),
            "final_loss": self.final_loss,
            "final_metrics": dict(self.final_metrics),
            "checkpoint": str(self.checkpoint),
            "resumed_from": _str(self.resumed_from),
            "num_workers": self.num_workers,
            "class_image_set": self.class_image_set,
            "class_images_dir": _str(self.class_images_dir),
            "validation_images": [str(p) for p in self.validation_images],
            "mlflow_run_id": self.mlflow_run_id,
            "registration": self.registration.to_json() if self.registration else None,
            "train_seconds": self.train_seconds,
            "total_seconds": self.total_seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingSummary:
        return cls(
            run_dir=Path(data["run_dir"]),
            export=Export.from_json(data["export"]),
            final_loss=data["final_loss"],
            final_metrics=dict(data["final_metrics"]),
            checkpoint=Path(data["checkpoint"]),
            resumed_from=_path(data["resumed_from"]),
            num_workers=int(data["num_workers"]),
            class_image_set=data["class_image_set"],
            class_images_dir=_path(data["class_images_dir"]),
            validation_images=[Path(p) for p in data["validation_images"]],
            mlflow_run_id=data["mlflow_run_id"],
            registration=Registration.from_json(data["registration"]) if data["registration"] else None,
            train_seconds=float(data["train_seconds"]),
            total_seconds=data["total_seconds"],
        )

    def write(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def read(cls, path: str | Path) -> TrainingSummary:
        return cls.from_json(json.loads(Path(path).read_text()))
