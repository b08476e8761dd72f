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
