"""One trial of a sweep: the training job with the sampled values, reporting to Ray Tune.

Ray 2.60's pattern for Tune over Train V2: Tune runs this function (with a token CPU, see
raybooth.tune.sweep); it builds the same TorchTrainer `raybooth train` uses (`run_training`) with
a TuneReportCallback in Ray Train's RunConfig, so every checkpoint report of the rank-0 worker
becomes one Tune result (`training_iteration`), carrying `objective` for the scheduler.

Each trial trains in its own run folder, `<sweep>/trials/<trial id>/`, always with
`run.resume_from: latest`: a trial restarted by a resumed sweep continues from its last
checkpoint; a fresh one starts at step 0.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from raybooth.jobs.train.driver import SUMMARY_FILE
from raybooth.platform.config import TrainConfig, with_overrides
from raybooth.platform.errors import find_user_error
from raybooth.platform.paths import write_json_atomic
from raybooth.tune.config import OBJECTIVE_KEY, Objective

TRIALS_DIR = "trials"
STARTS_FILE = "trial_starts.jsonl"  # one line per start of the trial function (restarts show)
ERROR_FILE = "trial_error.json"  # why the trial function failed, in one line (the driver prints it)


@dataclass(frozen=True)
class SweepContext:
    """What every trial shares (goes to the trial function through tune.with_parameters)."""

    base: dict[str, Any]  # the base TrainConfig, as JSON
    sweep_dir: str
    sweep_name: str
    objective: Objective
    scaling: dict[str, Any]  # the per-trial scaling section
    parent_run_id: str | None
    register_as: str | None


class ObjectiveReportCallback(TuneReportCallback):
    """Tune's report callback plus `objective`: the sweep's objective computed from the report
    (the last known value carried over when this checkpoint has no evaluation)."""

    def __init__(self, objective: Objective):
        super().__init__()
        self.objective = objective
        self.last: float | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        first = dict(metrics[0])
        value = self.objective.value(first)
        if value is not None:
            self.last = value
        if self.last is not None:
            first[OBJECTIVE_KEY] = self.last
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def trial_config(ctx: SweepContext, sampled: dict[str, Any], trial_id: str) -> TrainConfig:
    """The base config with the sampled values, this trial's run folder and the sweep's scaling.
    Registration is the sweep's business (the best trial only)."""
    base = TrainConfig.model_validate(ctx.base)
    s = ctx.scaling
    resources = dict(s["resources_per_worker"]) or ({} if s["use_gpu"] else {"CPU": 1.0})
    return with_overrides(base, {
        **sampled,
        "run.name": trial_id,
        "run.storage_path": str(Path(ctx.sweep_dir) / TRIALS_DIR),
        "run.resume_from": "latest",
        "scaling.num_workers": s["num_workers"],
        "scaling.use_gpu": s["use_gpu"],
        "scaling.resources_per_worker": resources,
        "tracking.register_as": None,
    })


def run_trial(sampled: dict[str, Any], ctx: SweepContext) -> None:
    """The Tune trainable (wrapped by tune.with_parameters and tune.with_resources)."""
    from ray import tune

    from raybooth.jobs.train.driver import run_training
    from raybooth.tune.tracking import ensure_child_run

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(ctx, sampled, trial_id)
    run_dir = Path(config.run.storage_path) / config.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    finished = run_dir / SUMMARY_FILE
    if finished.is_file():
        # The trial finished before the sweep's driver died, and Tune had not recorded it yet:
        # report what it ended with instead of running it again.
        from raybooth.jobs.train.handoff import TrainingSummary

        summary = TrainingSummary.read(finished)
        metrics = {"step": summary.steps, **summary.final_metrics}
        value = ctx.objective.value(metrics)
        if value is not None:
            metrics[OBJECTIVE_KEY] = value
        tune.report(metrics)
        return
    with open(run_dir / STARTS_FILE, "a") as f:
        f.write(json.dumps({"time": time.time(), "config": sampled}) + "\n")
    ensure_child_run(config, run_dir, parent_run_id=ctx.parent_run_id, sweep=ctx.sweep_name, trial_id=trial_id)
    try:
        run_training(config, progress=False, callbacks=[ObjectiveReportCallback(ctx.objective)])
    except Exception as exc:
        write_json_atomic(run_dir / ERROR_FILE, {"error": error_line(exc), "time": time.time()})
        raise


def read_trial_error(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / ERROR_FILE).read_text())["error"]
    except (OSError, ValueError, KeyError):
        return None


def error_line(error: BaseException) -> str:
    """Why a trial errored, in one line: the user error behind it (e.g. training diverged), else
    the last line of Ray's report (the exception itself; the first line is only the actor)."""
    found = find_user_error(error)
    if found is not None:
        return found.message[:500]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not any(line.startswith("File ") for line in lines):  # raised here, not a Ray report
        return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]
    last = lines[-1]
    # Only the text of a traceback left (Ray could not unpickle the error): a raybooth user
    # error's line is "raybooth.<module>.<Class>: message"; its message is the explanation.
    m = re.match(r"raybooth(?:\.\w+)+: (.+)", last)
    return (m.group(1) if m else last)[:500]
