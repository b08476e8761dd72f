"""MLflow for a sweep: one parent run (the sweep: its space, search, scheduler, results table,
best trial, plots) and, nested under it, each trial's own training run.

Nesting is MLflow's `mlflow.parentRunId` tag. A trial creates its child run before training starts
and records it in its run folder (`mlflow_run.json`); the training job then continues that run
(raybooth.platform.mlflow.runs continues a recorded run that has not finished), so the child *is*
the trial's training run: params, per-step metrics, validation grids, evaluation.

The parent is recorded in the sweep folder the same way, so a resumed sweep reopens the same run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from raybooth.platform.config import TrainConfig
from raybooth.platform.mlflow.runs import (
    RUN_RECORD,
    RunRecord,
    RunTracker,
    read_run_record,
)
from raybooth.platform.mlflow.store import (
    client_for,
    ensure_experiment,
    resolve_tracking_uri,
    server_reachable,
)
from raybooth.platform.paths import write_json_atomic

log = logging.getLogger("raybooth.tune")

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "raybooth.sweep"
TRIAL_TAG = "raybooth.sweep.trial_id"


def start_parent_run(base: TrainConfig, sweep_dir: Path, *, name: str, params: dict[str, Any],
                     tags: dict[str, str], resume: bool) -> RunTracker:
    """The sweep's run (created, or continued from sweep_dir/mlflow_run.json on --resume); a
    disabled tracker when tracking is off or the store is away."""
    if not base.tracking.enabled:
        return RunTracker.disabled()
    return RunTracker.start(
        tracking_uri=base.tracking.tracking_uri, experiment=base.tracking.experiment, run_name=name,
        run_dir=sweep_dir, params={k: str(v) for k, v in params.items()},
        tags={SWEEP_TAG: name, "raybooth.kind": "sweep", **tags}, continue_finished=resume,
    )


def ensure_child_run(config: TrainConfig, run_dir: Path, *, parent_run_id: str | None,
                     sweep: str, trial_id: str) -> str | None:
    """The trial's training run, nested under the sweep's: created once (a restarted trial keeps
    the one recorded in its run folder). None when there is no parent or the store is away."""
    if not parent_run_id or not config.tracking.enabled:
        return None
    uri = resolve_tracking_uri(config.tracking.tracking_uri)
    record = read_run_record(run_dir)
    if record is not None and record.tracking_uri == uri:
        return record.run_id
    try:
        if not server_reachable(uri):
            return None
        client = client_for(uri)
        experiment_id = ensure_experiment(client, config.tracking.experiment, uri)
        run = client.create_run(experiment_id, run_name=config.run.name, tags={
            PARENT_TAG: parent_run_id, SWEEP_TAG: sweep, TRIAL_TAG: trial_id})
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / RUN_RECORD, RunRecord(
            run_id=run.info.run_id, tracking_uri=uri, experiment_id=experiment_id,
            experiment=config.tracking.experiment).to_json())
        return run.info.run_id
    except Exception as exc:  # tracking never fails a trial
        log.warning("could not create the trial's MLflow run (%s); training logs without a parent", exc)
        return None


def close_child_run(tracking_uri: str | None, run_id: str | None, status: str) -> None:
    """End a trial's run from the driver with what Tune decided. A trial that Tune stopped (ASHA)
    may never end its own run (its actor was killed: still RUNNING) or end it FAILED (the stop
    reached the training job as an exception first) - which of the two is a race, so both become
    KILLED. A run that FINISHED is left alone."""
    if not run_id:
        return
    try:
        client = client_for(resolve_tracking_uri(tracking_uri))
        current = client.get_run(run_id).info.status
        if current == "RUNNING" or (status == "KILLED" and current == "FAILED"):
            client.set_terminated(run_id, status)
    except Exception as exc:
        log.warning("could not end trial run %s: %s", run_id, exc)


def tag_version(tracking_uri: str | None, name: str, version: str, tags: dict[str, str]) -> None:
    try:
        client = client_for(resolve_tracking_uri(tracking_uri))
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
    except Exception as exc:
        log.warning("could not tag %s version %s with the sweep: %s", name, version, exc)


def results_table(trials: list[Any]) -> dict[str, list[Any]]:
    """The sweep's trials, column-wise (what `log_table` takes)."""
    rows = [t.to_json() for t in trials]
    columns = ("trial_id", "status", "iterations", "final_objective", "best_objective", "mlflow_run_id")
    out = {c: [r[c] for r in rows] for c in columns}
    out["config"] = [json.dumps(r["config"], sort_keys=True) for r in rows]
    return out


def log_table(tracker: RunTracker, table: dict[str, list[Any]], artifact_file: str) -> None:
    if not tracker.enabled:
        return
    try:
        client_for(tracker.tracking_uri).log_table(tracker.run_id, data=table, artifact_file=artifact_file)
    except Exception as exc:
        log.warning("could not log the sweep's results table: %s", exc)
