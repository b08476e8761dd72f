"""Registering a trained run in the MLflow model registry: the export is logged on the run as a
pyfunc model, registered as `tracking.register_as`, and `tracking.alias` points at the new version.

The version is described from the training summary (raybooth.jobs.train.handoff): the model info
that loading needs (mode, base model, default steps) and tags a reader compares versions by
(subject, prompts, steps, final metrics). The generic part is raybooth.platform.mlflow.registry.
"""

from __future__ import annotations

import logging
import os

from raybooth.jobs.train.handoff import TrainingSummary
from raybooth.platform.config import TrainConfig
from raybooth.platform.generation import GENERATION_DEFAULTS
from raybooth.platform.mlflow.refs import (
    ModelInfo,
    is_registry_ref,
    model_uri,
    parse_ref,
)
from raybooth.platform.mlflow.registry import Registration, log_and_register

log = logging.getLogger("raybooth.train")


def model_info(config: TrainConfig, summary: TrainingSummary) -> ModelInfo:
    """raybooth_model.json for the run's export."""
    export = summary.export
    base, revision = export.base_model, export.base_revision
    if export.mode == "lora":
        if is_registry_ref(base) and str(revision or "").isdigit():
            # An adapter fits the exact weights it was trained on: pin the registry version
            # rather than an alias that may move on.
            base, revision = model_uri(parse_ref(base).name, version=revision), None
        elif os.path.isabs(os.path.expanduser(base)) or base.startswith("."):
            log.warning(
                "LoRA base model %s is a local folder: the registered model loads only where "
                "that folder exists (register the base model too, or train on a Hub id)", base,
            )
    return ModelInfo(
        mode=export.mode,
        base_model=base,
        base_revision=revision,
        default_steps=config.train.validation_steps,
        default_guidance_scale=GENERATION_DEFAULTS.guidance_scale,
        resolution=config.train.resolution,
        instance_prompt=config.subject.instance_prompt,
        identifier=config.subject.identifier,
        class_prompt=config.subject.class_prompt,
        steps=export.step,
    )


def version_tags(config: TrainConfig, summary: TrainingSummary) -> dict[str, str]:
    tags = {
        "subject": config.subject.identifier,
        "instance_prompt": config.subject.instance_prompt,
        "class_prompt": config.subject.class_prompt,
        "run_id": str(summary.mlflow_run_id),
        "mode": summary.mode,
        "base_model": summary.export.base_model,
        "steps": str(summary.steps),
    }
    if summary.final_loss is not None:
        tags["final_loss"] = f"{float(summary.final_loss):.6g}"
    if summary.class_image_set:
        tags["class_image_set"] = summary.class_image_set
    return tags


def register_training(config: TrainConfig, summary: TrainingSummary, *, wait_s: float = 60.0) -> Registration:
    """Log and register the run's export. A store that is away does not fail the finished
    training: the Registration then carries `error` (the model stays in the run directory)."""
    if summary.mlflow_run_id is None:
        raise ValueError("register_training needs a summary with an MLflow run (tracking was off)")
    return log_and_register(
        tracking_uri=config.tracking.tracking_uri,
        run_id=summary.mlflow_run_id,
        name=config.tracking.register_as,
        alias=config.tracking.alias,
        info=model_info(config, summary),
        model_dir=summary.model_path,
        version_tags=version_tags(config, summary),
        # The summary's final metrics come from the run directory's own log: complete even when
        # the run's last points are still on their way to a store that was away.
        metrics={k: float(v) for k, v in summary.final_metrics.items() if isinstance(v, (int, float))},
        wait_s=wait_s,
    )
