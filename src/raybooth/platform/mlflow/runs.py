"""One MLflow run, logged from the driver and from a worker, without ever blocking or failing
the caller.

The driver starts the run (`RunTracker.start`: or, on a restarted / resumed job, continues the one
recorded in `<run_dir>/mlflow_run.json`); a worker attaches to it by id (`RunTracker.attach`).
Every logging call returns at once: params, tags, metric points and files go to a buffered
sender (raybooth.platform.mlflow.sender) that delivers them in the background and rides out a
store that is away. A tracker that is disabled, or whose store could not be reached when the run
was created, is a no-op (`run_id` None) that never raises.

A run holds one point per (metric, step): a restarted worker trains the steps after its
checkpoint again, and a point the run already has is not sent twice. `backfill` delivers, after
the fact, what a worker recorded locally but could not send.

What to log (which params, which tags) is the caller's business: see
raybooth.jobs.train.tracking for a training run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from raybooth.platform.mlflow.sender import Sender, first_line
from raybooth.platform.mlflow.store import (
    client_for,
    ensure_experiment,
    is_http,
    refused,
    resolve_tracking_uri,
    server_reachable,
)
from raybooth.platform.paths import write_json_atomic

log = logging.getLogger("raybooth.mlflow")

RUN_RECORD = "mlflow_run.json"
# MLflow's limits (mlflow.utils.validation): per log_batch request, and per value.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000


# What the sender carries: one small record per thing to deliver.


@dataclass(frozen=True)
class _Param:
    key: str
    value: str


@dataclass(frozen=True)
class _Tag:
    key: str
    value: str


@dataclass(frozen=True)
class _Point:
    key: str
    value: float
    step: int
    timestamp_ms: int


@dataclass(frozen=True)
class _File:
    local: Path  # a private copy, removed once uploaded
    artifact_dir: str | None
    only_if_missing: bool = False


@dataclass(frozen=True)
class _End:
    status: str


_Item = Union[_Param, _Tag, _Point, _File, _End]


def _describe(item: _Item) -> str:
    if isinstance(item, _Param):
        return f"params {item.key}={item.value[:80]!r}"
    if isinstance(item, _Tag):
        return f"tags {item.key}={item.value[:80]!r}"
    if isinstance(item, _Point):
        return f"metrics {item.key}@{item.step}={item.value}"
    if isinstance(item, _File):
        return f"file {item.local.name}"
    return f"status {item.status}"


@dataclass(frozen=True)
class RunRecord:
    """<run_dir>/mlflow_run.json: which run a training run directory logs into."""

    run_id: str
    tracking_uri: str
    experiment_id: str
    experiment: str

    def to_json(self) -> dict[str, str]:
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri,
                "experiment_id": self.experiment_id, "experiment": self.experiment}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        return cls(run_id=str(data["run_id"]), tracking_uri=str(data["tracking_uri"]),
                   experiment_id=str(data["experiment_id"]), experiment=str(data["experiment"]))


def read_run_record(run_dir: str | Path) -> RunRecord | None:
    """The run the driver recorded for this run directory (None if none, or unreadable)."""
    try:
        return RunRecord.from_json(json.loads((Path(run_dir) / RUN_RECORD).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunTracker:
    """Logs to one MLflow run. Create with `start` (driver) or `attach` (a worker)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, *, owns_run: bool = False):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id: str | None = None
        self.reused = False
        self._owns_run = owns_run
        self._closed = False
        self._client = None
        self._logged_steps: dict[str, set[int]] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="raybooth-tracking-")) if run_id else None
        self._sender: Sender[_Item] | None = None
        if run_id:
            http = bool(tracking_uri) and is_http(str(tracking_uri))
            self._sender = Sender(
                self._deliver, destination=f"MLflow tracking at {tracking_uri} (run {run_id})",
                batch_size=MAX_METRICS_PER_BATCH, refused=refused,
                # Metric points may go in a long outage (the run directory keeps its own log);
                # params, tags, files and the final status are few and kept.
                droppable=lambda item: isinstance(item, _Point), describe=_describe,
                # After an outage of a tracking server, deliver as soon as it answers again.
                reachable=(lambda: server_reachable(str(tracking_uri), timeout_s=1.0)) if http else None,
            )

    # ---------------------------------------------------------------- construction

    @classmethod
    def disabled(cls) -> RunTracker:
        return cls(None, None)

    @classmethod
    def start(
        cls,
        *,
        tracking_uri: str | None,
        experiment: str,
        run_name: str,
        run_dir: str | Path,
        params: dict[str, str],
        tags: dict[str, str],
        continue_finished: bool = False,
    ) -> RunTracker:
        """Create a run in `experiment`, or continue the one recorded in run_dir/mlflow_run.json.

        The recorded run is continued unless it FINISHED and `continue_finished` is false (a
        finished job started again from scratch is a new run). A continued run gets only the
        params it does not have yet (MLflow params are immutable); a changed value is recorded as
        a `raybooth.param_changed.<key>` tag. Any store failure gives a disabled tracker (warned).
        """
        uri = resolve_tracking_uri(tracking_uri)
        run_dir = Path(run_dir)
        try:
            if not server_reachable(uri):
                log.warning(
                    "MLflow tracking server %s is not reachable; continuing without tracking "
                    "(start the server, or set tracking.enabled=false to silence this)", uri,
                )
                return cls.disabled()
            client = client_for(uri)
            experiment_id = ensure_experiment(client, experiment, uri)
            run_id = _reusable_run(client, uri, run_dir, continue_finished)
            reused = run_id is not None
            if reused:
                client.update_run(run_id, status="RUNNING")
                existing = client.get_run(run_id).data.params
            else:
                run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
                existing = {}
            record = RunRecord(run_id=run_id, tracking_uri=uri, experiment_id=experiment_id,
                               experiment=experiment)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_dir / RUN_RECORD, record.to_json())
        except Exception as exc:  # any store failure: go on without tracking, never fail
            log.warning("MLflow tracking at %s failed (%s: %s); continuing without tracking",
                        uri, type(exc).__name__, first_line(exc))
            return cls.disabled()
        tracker = cls(uri, run_id, owns_run=True)
        tracker.experiment_id = experiment_id
        tracker.reused = reused
        tracker.log_params({k: v for k, v in params.items() if k not in existing})
        tracker.set_tags({**tags, **{f"raybooth.param_changed.{k}": v for k, v in params.items()
                                     if k in existing and existing[k] != v}})
        if reused:
            tracker.set_tags({"raybooth.resumed": "true"})
        return tracker

    @classmethod
    def attach(cls, tracking_uri: str | None, run_id: str | None) -> RunTracker:
        """In a worker: log to the driver's run (never creates one)."""
        if not run_id:
            return cls.disabled()
        return cls(tracking_uri or resolve_tracking_uri(None), run_id, owns_run=False)

    # ---------------------------------------------------------------- logging (never raises)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def _put(self, items: list[_Item]) -> None:
        if self._sender is not None and not self._closed:
            self._sender.put_many(items)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or self._closed:
            return
        try:
            now = int(time.time() * 1000)
            self._put([_Point(str(k), float(v), int(step), now) for k, v in metrics.items() if v is not None])
        except Exception as exc:
            log.warning("could not record metrics %s at step %s: %s", sorted(metrics), step, exc)

    def log_params(self, params: dict[str, Any]) -> None:
        self._put([_Param(str(k), str(v)[:MAX_PARAM_VALUE]) for k, v in params.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put([_Tag(str(k), str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()])

    def log_image(self, image, artifact_file: str) -> None:
        """Save a PIL image as `artifact_file` (e.g. 'validation/step-000010.png') in the run."""
        if not self.enabled or self._closed:
            return
        try:
            rel = _relative(artifact_file)
            local = self._private_path(rel.name)
            image.save(local)
            self._put([_File(local, _parent(rel))])
        except Exception as exc:
            log.warning("could not record image %s: %s", artifact_file, exc)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file now (it may change later) and upload it in the background."""
        if not self.enabled or self._closed:
            return
        try:
            src = Path(local_path)
            local = self._private_path(src.name)
            shutil.copy2(src, local)
            self._put([_File(local, artifact_path)])
        except Exception as exc:
            log.warning("could not record artifact %s: %s", local_path, exc)

    def backfill(self, step_metrics: dict[int, dict[str, Any]], images: dict[str, Path] | None = None) -> None:
        """Deliver what a worker recorded locally but could not send (its process ended, or was
        killed, while the store was away): per-step metrics (`{step: {key: value, "time": s}}`)
        and image files (`{"validation/step-000010.png": path}`). Points and files the run already
        has are skipped, so this is safe to call after every run."""
        if not self.enabled or self._closed:
            return
        try:
            points: list[_Item] = []
            for step, record in sorted(step_metrics.items()):
                stamp = int(float(record.get("time") or time.time()) * 1000)
                for key, value in record.items():
                    if key in ("step", "time", "event") or not isinstance(value, (int, float)):
                        continue
                    points.append(_Point(key, float(value), int(step), stamp))
            for artifact_file, path in (images or {}).items():
                rel = _relative(artifact_file)
                local = self._private_path(rel.name)
                shutil.copy2(path, local)
                points.append(_File(local, _parent(rel), only_if_missing=True))
            self._put(points)
        except Exception as exc:
            log.warning("could not back-fill the run's metrics: %s", exc)

    def _private_path(self, name: str) -> Path:
        local = self._tmp / f"{time.monotonic_ns()}" / name
        local.parent.mkdir(parents=True)
        return local

    # ---------------------------------------------------------------- flushing and ending

    def pending(self) -> int:
        return self._sender.pending() if self._sender is not None else 0

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait up to `timeout_s` for everything logged to be delivered. True when it was; on
        timeout, warns (what is left keeps being retried in the background)."""
        return self._sender.flush(timeout_s) if self._sender is not None else True

    def end(self, status: str = "FINISHED", timeout_s: float = 30.0) -> None:
        """Deliver what is buffered and mark the run FINISHED / FAILED / KILLED (only the tracker
        that created or continued the run ends it; a worker's `end` just flushes)."""
        if self._sender is None or self._closed:
            return
        if self._owns_run:
            self._put([_End(status)])
        self._closed = True
        if self._sender.close(timeout_s):
            shutil.rmtree(self._tmp, ignore_errors=True)

    # ---------------------------------------------------------------- delivery (sender thread)

    def _deliver(self, batch: list[_Item]) -> None:
        """Send one batch, in the order it was logged within each kind: params, tags, metric
        points, files, and the final status last. Safe to repeat (the sender retries batches)."""
        if not server_reachable(self.tracking_uri):
            raise ConnectionError(f"{self.tracking_uri} does not answer")
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        client = self._client
        from mlflow.entities import Metric, Param, RunTag

        params = [Param(i.key, i.value) for i in batch if isinstance(i, _Param)]
        tags = [RunTag(i.key, i.value) for i in batch if isinstance(i, _Tag)]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH],
                             synchronous=True)
        for start in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self.run_id, tags=tags[start : start + MAX_PARAMS_TAGS_PER_BATCH],
                             synchronous=True)
        points = self._not_yet_logged(client, [i for i in batch if isinstance(i, _Point)])
        if points:
            client.log_batch(self.run_id, synchronous=True, metrics=[
                Metric(key=p.key, value=p.value, timestamp=p.timestamp_ms, step=p.step) for p in points
            ])
            for p in points:
                self._logged_steps[p.key].add(p.step)
        for item in batch:
            if isinstance(item, _File):
                self._upload(client, item)
        for item in batch:
            if isinstance(item, _End):
                client.set_terminated(self.run_id, status=item.status)

    def _upload(self, client, item: _File) -> None:
        if not item.local.is_file():
            return  # uploaded by an earlier try of this batch
        if item.only_if_missing:
            present = {Path(a.path).name for a in client.list_artifacts(self.run_id, item.artifact_dir)}
            if item.local.name in present:
                shutil.rmtree(item.local.parent, ignore_errors=True)
                return
        client.log_artifact(self.run_id, str(item.local), artifact_path=item.artifact_dir)
        shutil.rmtree(item.local.parent, ignore_errors=True)

    def _not_yet_logged(self, client, points: list[_Point]) -> list[_Point]:
        """One point per (metric, step) in a run: a restarted worker trains the steps after its
        checkpoint again (to the same values: resume is exact), and those must not show twice in
        the history. What the run already has is read once per key."""
        for key in {p.key for p in points} - set(self._logged_steps):
            self._logged_steps[key] = {m.step for m in client.get_metric_history(self.run_id, key)}
        fresh, seen = [], set()
        for p in points:
            if p.step in self._logged_steps[p.key] or (p.key, p.step) in seen:
                continue
            seen.add((p.key, p.step))
            fresh.append(p)
        return fresh

    def __repr__(self) -> str:
        return f"RunTracker(run_id={self.run_id!r}, tracking_uri={self.tracking_uri!r})"


def _reusable_run(client, uri: str, run_dir: Path, continue_finished: bool) -> str | None:
    record = read_run_record(run_dir)
    if record is None or record.tracking_uri != uri:
        return None
    try:
        run = client.get_run(record.run_id)
    except Exception:
        return None  # deleted store, or a run that no longer exists: start a new one
    if run.info.lifecycle_stage == "deleted":
        return None
    if run.info.status == "FINISHED" and not continue_finished:
        return None
    return run.info.run_id


def _relative(artifact_file: str) -> Path:
    rel = Path(artifact_file)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"artifact_file must be a relative path (got {artifact_file!r})")
    return rel


def _parent(rel: Path) -> str | None:
    return str(rel.parent) if str(rel.parent) != "." else None
