"""`raybooth train` with MLflow tracking on against a real `mlflow server` that is stopped during
training and started again: training finishes, and the run still ends up complete (LoRA mode,
registered too), and the registered adapter generates.

The same checks on the embedded store, with the rank-0 worker (the one that logs) killed mid-run,
are part of tests/test_train_runs.py::test_worker_killed_mid_run_resumes_exactly.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from _mlflow_server import shared_server
from _train_support import StepWatcher, check_tracked_run, generate_one, small_config

from raybooth.jobs.train.driver import run_training
from raybooth.platform.config import TrainConfig
from raybooth.platform.lora import WEIGHTS_NAME

MAX_STEPS = 8

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _config(storage: Path, name: str, **values) -> TrainConfig:
    return small_config(storage, name, **{
        "subject.instance_prompt": "a photo of sks robot toy",
        "subject.class_prompt": "a photo of a robot toy",
        "train.max_steps": MAX_STEPS,
        "train.checkpoint_every": 4,
        "train.keep_checkpoints": 2,
        "train.validation_every": 4,
        "train.validation_prompts": ["a photo of sks robot toy on a beach"],
        "train.validation_steps": 2,
        "run.max_failures": 1,
        "tracking.enabled": True,
        "tracking.experiment": "train-e2e",
        "tracking.register_as": name,
        **values,
    })


@pytest.mark.timeout(420)
def test_tracking_server_down_mid_training_does_not_stop_it(ray_local, tmp_path, monkeypatch):
    server = shared_server()
    name = "e2e-outage"
    config = _config(tmp_path, name, **{"tracking.tracking_uri": server.url, "train.mode": "lora",
                                        "train.lora_rank": 4, "train.learning_rate": 1e-3})
    run_dir = tmp_path / name
    events: dict = {}

    def stop(step: int) -> None:
        events["stopped_at"] = step
        server.stop()

    def start(step: int) -> None:
        events["restarting_at"] = step
        server.start()

    try:
        with StepWatcher(run_dir, [(2, stop), (4, start)], join_s=120):
            summary = run_training(config, progress=False)
    finally:
        shared_server()  # running again whatever happened
    assert events.get("stopped_at", MAX_STEPS) < MAX_STEPS, "the server was not stopped mid-training"
    assert events.get("restarting_at") is not None
    # Training finished in full, and nothing of the run was lost.
    assert summary.steps == MAX_STEPS and summary.mode == "lora"
    assert (summary.lora_path / WEIGHTS_NAME).is_file()
    check_tracked_run(mlflow.MlflowClient(tracking_uri=server.url), summary, config)

    # Served from the registry: LoRA on top of the base model it names.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    image = generate_one(f"models:/{name}@candidate", tmp_path / "g")
    assert image.shape == (64, 64, 3)
