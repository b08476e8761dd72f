"""Helpers for the training tests: a small tiny-model config, and acting on a run mid-training
(kill a worker, remove a node, stop a server) once it has passed a step."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from raybooth.jobs.train.metrics import step_metrics
from raybooth.platform.config import TrainConfig, with_overrides

REPO = Path(__file__).resolve().parents[1]
DEMO_SUBJECT = REPO / "examples" / "demo-subject"


def small_config(storage: Path, name: str, **values) -> TrainConfig:
    """A tiny-model run of a few seconds a step: what every training test shares, then `values`
    (dotted keys, as `--set` takes them)."""
    return with_overrides(TrainConfig(), {
        "subject.instance_data_dir": str(DEMO_SUBJECT),
        "priors.enabled": False,
        "train.resolution": 64,
        "train.batch_size": 1,
        "train.learning_rate": 1e-4,
        "train.log_every": 1,
        "train.validation_prompts": [],
        "scaling.num_workers": 2,
        "run.storage_path": str(storage),
        "run.name": name,
        "tracking.enabled": False,
        **values,
    })


def registered_checkpoint(run_dir: Path) -> bool:
    """Ray Train has registered a checkpoint of this run (so a restart resumes from it)."""
    try:
        return "checkpoint-0000" in (run_dir / "checkpoint_manager_snapshot.json").read_text()
    except OSError:
        return False


class StepWatcher:
    """Runs each `(step, action)` once training (metrics.jsonl in `run_dir`) has passed `step`;
    the action gets the step reached. With `after_checkpoint`, an action also waits until Ray
    Train has registered a checkpoint (a kill before that restarts from scratch).

        with StepWatcher(run_dir, [(5, kill)], after_checkpoint=True):
            summary = run_training(config, progress=False)
    """

    def __init__(self, run_dir: Path, actions: list[tuple[int, Callable[[int], None]]],
                 after_checkpoint: bool = False, timeout_s: float = 300, join_s: float = 5):
        self.run_dir, self.pending = run_dir, list(actions)
        self.after_checkpoint, self.timeout_s, self.join_s = after_checkpoint, timeout_s, join_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _ready(self, step: int) -> bool:
        metrics = step_metrics(self.run_dir)
        reached = bool(metrics) and max(metrics) >= step
        return reached and (not self.after_checkpoint or registered_checkpoint(self.run_dir))

    def _loop(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self.pending and not self.done.is_set() and time.monotonic() < deadline:
            step, action = self.pending[0]
            if self._ready(step):
                self.pending.pop(0)
                action(max(step_metrics(self.run_dir)))
                continue
            time.sleep(0.01)

    def __enter__(self) -> "StepWatcher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=self.join_s)


TRACKED_METRICS = ("loss", "instance_loss", "prior_loss", "lr", "steps_per_second", "samples_per_second",
                   "peak_memory_mb")


def check_tracked_run(client, summary, config: TrainConfig) -> None:
    """What every tracked training must leave in MLflow: one run for the whole job with every
    config value as a param, one point per step of every metric (the same losses as the run
    directory's own log), the validation grids as artifacts, and the registered version under
    the `candidate` alias, which summary.json names."""
    import pytest

    from raybooth.jobs.train.handoff import TrainingSummary
    from raybooth.platform.config import flatten

    run_id = summary.mlflow_run_id
    t = config.train
    runs = client.search_runs(
        [client.get_experiment_by_name(config.tracking.experiment).experiment_id],
        filter_string=f"tags.mlflow.runName = '{config.run.name}'",
    )
    assert [r.info.run_id for r in runs] == [run_id]  # one run for the whole job
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert set(flatten(config)) <= set(run.data.params)
    assert run.data.params["train.max_steps"] == str(t.max_steps)
    for key in TRACKED_METRICS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, t.max_steps + 1)), key  # one point per step
    local = step_metrics(summary.run_dir)
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx({s: r["loss"] for s, r in local.items()})
    grids = sorted({*range(t.validation_every, t.max_steps + 1, t.validation_every), t.max_steps})
    files = sorted(a.path for a in client.list_artifacts(run_id, "validation"))
    assert files == [f"validation/step-{s:06d}.png" for s in grids]
    tags = run.data.tags
    assert tags["raybooth.num_workers"] == str(config.scaling.num_workers)
    assert tags["version.ray"] and tags["version.torch"]
    assert tags["raybooth.subject.instance_prompt"] == config.subject.instance_prompt

    # Registered, with the alias, and summary.json says so.
    name = config.tracking.register_as
    version = client.get_model_version_by_alias(name, "candidate")
    assert str(version.version) == summary.registration.registered_version
    assert version.run_id == run_id and version.tags["run_id"] == run_id
    assert float(version.tags["metric.loss"]) == pytest.approx(local[t.max_steps]["loss"], rel=1e-4)
    on_disk = TrainingSummary.read(summary.run_dir / "summary.json")
    assert on_disk == summary and on_disk.mlflow_run_id == run_id
    assert on_disk.registration.registered_model == name
    assert on_disk.model_uri == f"models:/{name}@candidate"


def generate_one(model: str, out: Path):
    """`raybooth generate --model MODEL` (a folder or models:/NAME@ALIAS): the image as an array."""
    import numpy as np
    from PIL import Image

    from raybooth.cli import main as cli

    assert cli(["generate", "--model", model, "--prompt", "a photo of sks robot toy", "--seed", "5",
                "--steps", "2", "--out", str(out)]) == 0
    return np.asarray(Image.open(sorted(out.glob("*.png"))[0]).convert("RGB"))
