"""What a training run records in MLflow besides its metrics: every resolved config value as a
param, and tags that make the run findable and comparable (subject, prompts, base model, mode,
hardware, library versions, git commit).

The driver starts the run here (`start_training_run`); the rank-0 worker attaches to it by id and
logs metrics and validation images (raybooth.platform.mlflow.runs does the delivery).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from raybooth.platform.config import TrainConfig, flatten
from raybooth.platform.mlflow.runs import MAX_PARAM_VALUE, RunTracker

VERSIONED_MODULES = ("raybooth", "ray", "torch", "diffusers", "transformers", "accelerate", "mlflow")


def start_training_run(config: TrainConfig, run_dir: Path) -> RunTracker:
    """The job's MLflow run (created, or continued from run_dir/mlflow_run.json), or a disabled
    tracker when tracking is off or the store cannot be reached (training goes on either way).

    A recorded run that FINISHED is continued only when this job resumes (`run.resume_from`): a
    finished job started again from scratch is a new run.
    """
    if not config.tracking.enabled:
        return RunTracker.disabled()
    return RunTracker.start(
        tracking_uri=config.tracking.tracking_uri,
        experiment=config.tracking.experiment,
        run_name=config.run.name,
        run_dir=run_dir,
        params=config_params(config),
        tags=run_tags(config),
        continue_finished=bool(config.run.resume_from),
    )


def config_params(config: TrainConfig) -> dict[str, str]:
    """Every resolved config value as an MLflow param (lists as JSON, None as 'None')."""
    out = {}
    for key, value in flatten(config).items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        out[key] = text[:MAX_PARAM_VALUE]
    return out


def run_tags(config: TrainConfig) -> dict[str, str]:
    """Tags that make a run findable and comparable: versions, hardware, subject and prompts."""
    tags = {
        "raybooth.subject.identifier": config.subject.identifier,
        "raybooth.subject.instance_prompt": config.subject.instance_prompt,
        "raybooth.subject.class_prompt": config.subject.class_prompt,
        "raybooth.subject.instance_data_dir": config.subject.instance_data_dir,
        "raybooth.validation_prompts": json.dumps(config.train.validation_prompts),
        "raybooth.base_model": config.model,
        "raybooth.mode": config.train.mode,
        "raybooth.run_name": config.run.name,
        "raybooth.num_workers": str(config.scaling.num_workers),
        "raybooth.device_type": "cuda" if config.scaling.use_gpu else "cpu",
        "raybooth.mixed_precision": config.train.mixed_precision,
    }
    for module in VERSIONED_MODULES:
        v = _version(module)
        if v:
            tags[f"version.{module}"] = v
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["raybooth.git_commit"] = commit
    return tags


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None
