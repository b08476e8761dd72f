"""`raybooth train` with MLflow tracking on, end to end (tiny model, two Ray Train workers, CPU).

- On the embedded store, with the rank-0 worker (the one that logs) killed mid-run: one MLflow
  run with every config value as a param, one `loss` point per step, the validation grids as
  artifacts, the class-image set as a tag, a registered version under the alias; summary.json
  names them; `raybooth generate --model models:/NAME@ALIAS` and pyfunc predict work.
- Against a real `mlflow server` that is stopped during training and started again: training
  finishes, and the run still ends up complete (LoRA mode, registered too).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from _mlflow_server import shared_server
from _train_support import StepWatcher, small_config
from PIL import Image

from raybooth.cli import main as cli
from raybooth.jobs.train.driver import run_training
from raybooth.jobs.train.handoff import TrainingSummary
from raybooth.jobs.train.metrics import read_records, step_metrics
from raybooth.platform.config import TrainConfig, flatten
from raybooth.platform.lora import WEIGHTS_NAME
from raybooth.platform.mlflow.pyfunc import decode_png

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 8
CHECKPOINT_EVERY = 4
METRICS = ("loss", "instance_loss", "prior_loss", "lr", "steps_per_second", "samples_per_second",
           "peak_memory_mb")

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _config(storage: Path, name: str, **values) -> TrainConfig:
    return small_config(storage, name, **{
        "subject.instance_prompt": "a photo of sks robot toy",
        "subject.class_prompt": "a photo of a robot toy",
        "train.max_steps": MAX_STEPS,
        "train.checkpoint_every": CHECKPOINT_EVERY,
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


def _check_run(client, summary: TrainingSummary, config: TrainConfig) -> None:
    """What every tracked training must leave in MLflow."""
    run_id = summary.mlflow_run_id
    max_steps = config.train.max_steps
    runs = client.search_runs(
        [client.get_experiment_by_name("train-e2e").experiment_id],
        filter_string=f"tags.mlflow.runName = '{config.run.name}'",
    )
    assert [r.info.run_id for r in runs] == [run_id]  # one run for the whole job
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert set(flatten(config)) <= set(run.data.params)
    assert run.data.params["train.max_steps"] == str(max_steps)
    for key in METRICS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, max_steps + 1)), key  # one point per step
    local = step_metrics(summary.run_dir)
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx({s: r["loss"] for s, r in local.items()})
    files = sorted(a.path for a in client.list_artifacts(run_id, "validation"))
    assert files == [f"validation/step-{s:06d}.png" for s in range(4, max_steps + 1, 4)]
    tags = run.data.tags
    assert tags["raybooth.num_workers"] == "2" and tags["version.ray"] and tags["version.torch"]
    assert tags["raybooth.subject.instance_prompt"] == "a photo of sks robot toy"

    # Registered, with the alias, and summary.json says so.
    name = config.tracking.register_as
    version = client.get_model_version_by_alias(name, "candidate")
    assert str(version.version) == summary.registration.registered_version
    assert version.run_id == run_id and version.tags["run_id"] == run_id
    assert float(version.tags["metric.loss"]) == pytest.approx(local[max_steps]["loss"], rel=1e-4)
    on_disk = TrainingSummary.read(summary.run_dir / "summary.json")
    assert on_disk == summary and on_disk.mlflow_run_id == run_id
    assert on_disk.registration.registered_model == name
    assert on_disk.model_uri == f"models:/{name}@candidate"


def _generate(model: str, out: Path) -> np.ndarray:
    assert cli(["generate", "--model", model, "--prompt", "a photo of sks robot toy", "--seed", "5",
                "--steps", "2", "--out", str(out)]) == 0
    return np.asarray(Image.open(sorted(out.glob("*.png"))[0]).convert("RGB"))


@pytest.mark.timeout(420)
def test_tracked_training_with_the_logging_worker_killed(ray_local, tmp_path, raybooth_home):
    name = "e2e-killed"
    # More steps after the first checkpoint than the kill needs to land (Ray Train registers a
    # checkpoint a little after the step that wrote it).
    config = _config(tmp_path, name, **{
        "train.max_steps": 3 * MAX_STEPS // 2,
        "priors.enabled": True,
        "priors.class_data_dir": str(raybooth_home / "tracking-class-images"),
        "priors.num_class_images": 2,
        "priors.steps": 1,
        "priors.num_actors": 1,
    })
    run_dir = tmp_path / name
    killed: dict = {}

    def kill_rank0(step: int) -> None:
        info = json.loads((run_dir / "workers" / "rank-0.json").read_text())
        killed.update(info, at_step=step)
        os.kill(info["pid"], signal.SIGKILL)  # the Ray Train worker that holds the MLflow tracker

    with StepWatcher(run_dir, [(CHECKPOINT_EVERY + 1, kill_rank0)], after_checkpoint=True):
        summary = run_training(config, progress=False)
    assert killed and killed["at_step"] < config.train.max_steps, "the worker was not killed mid-run"
    assert len([r for r in read_records(run_dir) if r.get("event") == "resumed"]) == 1

    client = mlflow.MlflowClient()  # the embedded store (conftest points MLFLOW_TRACKING_URI there)
    _check_run(client, summary, config)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.tags["raybooth.class_image_set"] == summary.class_image_set

    # The registered model is the exported one: same pixels through the registry and the folder.
    via_registry = _generate(f"models:/{name}@candidate", tmp_path / "a")
    assert np.array_equal(via_registry, _generate(str(summary.model_path), tmp_path / "b"))
    out = mlflow.pyfunc.load_model(f"models:/{name}@candidate").predict(
        pd.DataFrame({"prompt": ["a photo of sks robot toy"], "seed": [5], "steps": [2]}))
    assert np.array_equal(np.asarray(decode_png(out["image"][0])), via_registry)


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
    _check_run(mlflow.MlflowClient(tracking_uri=server.url), summary, config)

    # Served from the registry: LoRA on top of the base model it names.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    image = _generate(f"models:/{name}@candidate", tmp_path / "g")
    assert image.shape == (64, 64, 3)
