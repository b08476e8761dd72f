"""MLflow tracking of a training run: one MLflow run per training job, logged from the driver and
the rank-0 Ray Train worker only.

Where runs go:
- `tracking.tracking_uri` in the config, else `$MLFLOW_TRACKING_URI`, else the embedded store
  `sqlite:///$RAYBOOTH_HOME/mlflow.db` with artifacts in `$RAYBOOTH_HOME/mlartifacts` (nothing to
  start on one machine; `raybooth mlflow-ui` opens it).

Tracking must never stop training. Every call here returns at once: metrics, params, tags and
images go into a buffer that a background thread delivers in batches. When the store cannot be
reached (a tracking server restarting, a locked SQLite file) the thread warns once, keeps the
buffer and retries with back-off; once the store answers again, everything buffered arrives with
its original step and timestamp. A tracker that is disabled, or whose store is unreachable when
the run is created, is a no-op object (`run_id` None) that warns and never raises.

The driver creates (or, on a resumed / restarted job, reuses) the run and records its id in
`<run_dir>/mlflow_run.json`; the rank-0 worker attaches to it by id. A run holds one point per
(metric, step): a restarted worker trains the steps after its checkpoint again, and a point the
run already has is not sent twice. After training the driver back-fills, from the run
directory's own metrics log and validation images, whatever a worker could not deliver (the
store was away when it finished, or the worker was killed with points still buffered).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from raybooth.platform.config import TrainConfig, flatten
from raybooth.platform.paths import raybooth_home, write_json_atomic

log = logging.getLogger("raybooth.tracking")

RUN_RECORD = "mlflow_run.json"
# MLflow's limits per log_batch request (mlflow.utils.validation).
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
# A run of many thousand steps logs ~7 metrics per step; beyond this many undelivered points the
# oldest are dropped (with a warning) rather than letting an outage grow memory without bound.
_MAX_BUFFERED_METRICS = 200_000
_RETRY_MIN_S = 0.5
_RETRY_MAX_S = 10.0
# After end(), undelivered data is retried this long in the background, then dropped (warned):
# a long-lived process (many Tune trials) must not keep threads for a store that is gone.
_GIVE_UP_AFTER_END_S = 600.0
_HEALTH_TIMEOUT_S = 3.0


# ---------------------------------------------------------------------------------------------
# Where the store is


def embedded_tracking_uri() -> str:
    return f"sqlite:///{raybooth_home() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return env or embedded_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (None for anything else)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///") :]))


def default_artifact_root(uri: str) -> str | None:
    """For a SQLite store: `<dir of the .db>/mlartifacts` (the embedded default puts artifacts in
    $RAYBOOTH_HOME/mlartifacts). For a server, None: the server decides (e.g. proxied to S3)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / "mlartifacts").resolve().as_uri()


def is_http(uri: str) -> bool:
    return urlparse(uri).scheme in {"http", "https"}


def server_reachable(uri: str, timeout_s: float = _HEALTH_TIMEOUT_S) -> bool:
    """A cheap probe before a call that would otherwise sit in MLflow's own retry loop (minutes
    with the default back-off). Only a connection failure counts as down: a 401/403 from an
    authenticating proxy still means the server is there."""
    if not is_http(uri):
        return True
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        return True
    except requests.RequestException:
        return False


def client_for(uri: str):
    """An MlflowClient for `uri` (tracking and registry on the same store)."""
    from mlflow import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with the store's artifact root) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = default_artifact_root(uri)
    location = None
    if root is not None:
        location = f"{root}/{_safe_name(name)}"
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        # Another process created it between our lookup and create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


# ---------------------------------------------------------------------------------------------
# What a run records besides the config


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
    for module in ("raybooth", "ray", "torch", "diffusers", "transformers", "accelerate", "mlflow"):
        v = _version(module)
        if v:
            tags[f"version.{module}"] = v
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["raybooth.git_commit"] = commit
    return tags


def config_params(config: TrainConfig) -> dict[str, str]:
    """Every resolved config value as an MLflow param (lists as JSON, None as 'None')."""
    out = {}
    for key, value in flatten(config).items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        out[key] = text[:_MAX_PARAM_VALUE]
    return out


# ---------------------------------------------------------------------------------------------
# The tracker


@dataclass
class _Buffer:
    metrics: list = field(default_factory=list)  # mlflow.entities.Metric, oldest first
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    # (local file, artifact dir, only if the run does not have it yet)
    artifacts: list[tuple[Path, str | None, bool]] = field(default_factory=list)
    terminate: str | None = None  # status for set_terminated, sent last

    def empty(self) -> bool:
        return not (self.metrics or self.params or self.tags or self.artifacts or self.terminate)

    def size(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags) + len(self.artifacts)


_LIVE: "weakref.WeakSet[RunTracker]" = weakref.WeakSet()


class RunTracker:
    """Logs to one MLflow run without ever blocking or failing the caller.

    Create it with `for_driver` (driver: creates or reuses the run) or `attach` (rank-0 worker).
    A tracker with `run_id` None does nothing.
    """

    def __init__(self, tracking_uri: str | None, run_id: str | None, *, owns_run: bool = False):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id: str | None = None
        self.reused = False
        self._owns_run = owns_run
        self._buffer = _Buffer()
        self._cond = threading.Condition()
        self._sending = False
        self._down_since: float | None = None
        self._delivered_metrics = 0
        self._dropped_metrics = 0
        self._inflight_metrics = 0
        self._logged_steps: dict[str, set[int]] = {}
        self._closed = False
        self._closed_at = 0.0
        self._tmp = Path(tempfile.mkdtemp(prefix="raybooth-tracking-")) if run_id else None
        self._thread: threading.Thread | None = None
        if run_id:
            self._thread = threading.Thread(target=self._deliver_loop, name="raybooth-mlflow", daemon=True)
            self._thread.start()
            _LIVE.add(self)

    # ---------------------------------------------------------------- construction

    @classmethod
    def disabled(cls) -> "RunTracker":
        return cls(None, None)

    @classmethod
    def for_driver(cls, config: TrainConfig, run_dir: Path) -> "RunTracker":
        """Create the job's MLflow run, or continue the one recorded in run_dir/mlflow_run.json.

        The recorded run is continued unless it FINISHED and this is not a resume
        (`run.resume_from` unset): a finished job started again from scratch is a new run.
        """
        if not config.tracking.enabled:
            return cls.disabled()
        uri = resolve_tracking_uri(config.tracking.tracking_uri)
        run_dir = Path(run_dir)
        try:
            if not server_reachable(uri):
                log.warning(
                    "MLflow tracking server %s is not reachable; training continues without "
                    "tracking (start the server, or set tracking.enabled=false to silence this)",
                    uri,
                )
                return cls.disabled()
            client = client_for(uri)
            experiment_id = ensure_experiment(client, config.tracking.experiment, uri)
            run_id = cls._reusable_run(client, uri, run_dir, config)
            reused = run_id is not None
            if reused:
                client.update_run(run_id, status="RUNNING")
            else:
                run = client.create_run(experiment_id, run_name=config.run.name)
                run_id = run.info.run_id
            record = {"run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id,
                      "experiment": config.tracking.experiment}
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_dir / RUN_RECORD, record)
        except Exception as exc:  # any store failure: train without tracking, never fail
            log.warning(
                "MLflow tracking at %s failed (%s: %s); training continues without tracking",
                uri, type(exc).__name__, _first_line(exc),
            )
            return cls.disabled()
        tracker = cls(uri, run_id, owns_run=True)
        tracker.experiment_id = experiment_id
        tracker.reused = reused
        params = config_params(config)
        if reused:
            tracker._queue_changed_params(client, params)
        else:
            tracker.log_params(params)
        tracker.set_tags(run_tags(config))
        if reused:
            tracker.set_tags({"raybooth.resumed": "true"})
        return tracker

    @staticmethod
    def _reusable_run(client, uri: str, run_dir: Path, config: TrainConfig) -> str | None:
        record_path = run_dir / RUN_RECORD
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("tracking_uri") != uri or not record.get("run_id"):
            return None
        try:
            run = client.get_run(record["run_id"])
        except Exception:
            return None  # deleted store, or a run that no longer exists: start a new one
        if run.info.lifecycle_stage == "deleted":
            return None
        if run.info.status == "FINISHED" and not config.run.resume_from:
            return None
        return run.info.run_id

    @classmethod
    def attach(cls, tracking_uri: str | None, run_id: str | None) -> "RunTracker":
        """Inside the rank-0 Ray Train worker: log to the driver's run (never creates one)."""
        if not run_id:
            return cls.disabled()
        return cls(tracking_uri or resolve_tracking_uri(None), run_id, owns_run=False)

    # ---------------------------------------------------------------- logging (never raises)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or self._closed:
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            points = []
            for key, value in metrics.items():
                if value is None:
                    continue
                points.append(Metric(key=str(key), value=float(value), timestamp=now, step=int(step)))
            with self._cond:
                self._buffer.metrics.extend(points)
                overflow = len(self._buffer.metrics) - _MAX_BUFFERED_METRICS
                if overflow > 0:
                    # Drop the oldest points that are not in flight right now.
                    start = self._inflight_metrics
                    del self._buffer.metrics[start : start + overflow]
                    if self._dropped_metrics == 0:
                        log.warning("MLflow run %s: buffer full, dropping the oldest metric points",
                                    self.run_id)
                    self._dropped_metrics += overflow
                self._cond.notify_all()
        except Exception as exc:  # a bad value must not stop training either
            log.warning("could not record metrics %s at step %s: %s", list(metrics), step, exc)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled or self._closed:
            return
        with self._cond:
            for key, value in params.items():
                self._buffer.params[str(key)] = str(value)[:_MAX_PARAM_VALUE]
            self._cond.notify_all()

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled or self._closed:
            return
        with self._cond:
            for key, value in tags.items():
                self._buffer.tags[str(key)] = str(value)[:_MAX_TAG_VALUE]
            self._cond.notify_all()

    def log_image(self, image, artifact_file: str) -> None:
        """Save a PIL image as `artifact_file` (e.g. 'validation/step-000010.png') in the run."""
        if not self.enabled or self._closed:
            return
        try:
            rel = Path(artifact_file)
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"artifact_file must be a relative path (got {artifact_file!r})")
            local = self._tmp / f"{time.monotonic_ns()}" / rel.name
            local.parent.mkdir(parents=True)
            image.save(local)
            self._queue_artifact(local, str(rel.parent) if str(rel.parent) != "." else None)
        except Exception as exc:
            log.warning("could not record image %s: %s", artifact_file, exc)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file now (it may change later) and upload it in the background."""
        if not self.enabled or self._closed:
            return
        try:
            src = Path(local_path)
            local = self._tmp / f"{time.monotonic_ns()}" / src.name
            local.parent.mkdir(parents=True)
            shutil.copy2(src, local)
            self._queue_artifact(local, artifact_path)
        except Exception as exc:
            log.warning("could not record artifact %s: %s", local_path, exc)

    def _queue_artifact(self, local: Path, artifact_dir: str | None, only_if_missing: bool = False) -> None:
        with self._cond:
            self._buffer.artifacts.append((local, artifact_dir, only_if_missing))
            self._cond.notify_all()

    def backfill(self, step_metrics: dict[int, dict[str, Any]], images: dict[str, Path] | None = None) -> None:
        """Deliver what a worker recorded locally but could not send (its process ended, or was
        killed, while the store was away): per-step metrics (`{step: {key: value, "time": s}}`)
        and image files (`{"validation/step-000010.png": path}`). Points and files the run already
        has are skipped, so this is safe to call after every training."""
        if not self.enabled or self._closed:
            return
        try:
            from mlflow.entities import Metric

            points = []
            for step, record in sorted(step_metrics.items()):
                stamp = int(float(record.get("time") or time.time()) * 1000)
                for key, value in record.items():
                    if key in ("step", "time", "event") or not isinstance(value, (int, float)):
                        continue
                    points.append(Metric(key=key, value=float(value), timestamp=stamp, step=int(step)))
            with self._cond:
                self._buffer.metrics.extend(points)
                self._cond.notify_all()
            for artifact_file, path in (images or {}).items():
                rel = Path(artifact_file)
                local = self._tmp / f"{time.monotonic_ns()}" / rel.name
                local.parent.mkdir(parents=True)
                shutil.copy2(path, local)
                self._queue_artifact(local, str(rel.parent) if str(rel.parent) != "." else None, True)
        except Exception as exc:
            log.warning("could not back-fill the run's metrics: %s", exc)

    def _queue_changed_params(self, client, params: dict[str, str]) -> None:
        """On a continued run, params are immutable in MLflow: log only new keys, and note a value
        that changed (e.g. run.resume_from) as a tag instead of failing the batch."""
        try:
            existing = client.get_run(self.run_id).data.params
        except Exception:
            existing = {}
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {f"raybooth.param_changed.{k}": v for k, v in params.items()
                   if k in existing and existing[k] != v}
        self.log_params(new)
        self.set_tags(changed)

    # ---------------------------------------------------------------- flushing and ending

    def pending(self) -> int:
        with self._cond:
            return self._buffer.size() + (1 if self._sending else 0)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait up to `timeout_s` for everything buffered to be delivered. True when it was; on
        timeout, warns (what is still buffered keeps being retried in the background)."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
            while not self._buffer.empty() or self._sending:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "MLflow run %s: %d metric points, %d params/tags and %d files not yet "
                        "delivered to %s after %.0f s; still retrying in the background",
                        self.run_id, len(self._buffer.metrics),
                        len(self._buffer.params) + len(self._buffer.tags),
                        len(self._buffer.artifacts), self.tracking_uri, timeout_s,
                    )
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def end(self, status: str = "FINISHED", timeout_s: float = 30.0) -> None:
        """Deliver what is buffered and mark the run FINISHED / FAILED / KILLED (only a tracker
        that created or continued the run ends it; a worker's `end` just flushes)."""
        if not self.enabled or self._closed:
            return
        if self._owns_run:
            with self._cond:
                self._buffer.terminate = status
                self._cond.notify_all()
        self.flush(timeout_s)
        self._closed_at = time.monotonic()
        self._closed = True
        with self._cond:
            done = self._buffer.empty() and not self._sending
            self._cond.notify_all()
        if done:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def delivered_metrics(self) -> int:
        return self._delivered_metrics

    # ---------------------------------------------------------------- background delivery

    def _deliver_loop(self) -> None:
        client = None
        delay = _RETRY_MIN_S
        while True:
            with self._cond:
                while self._buffer.empty():
                    if self._closed:
                        return
                    self._cond.wait(1.0)
                self._sending = True
            try:
                if not server_reachable(self.tracking_uri):
                    raise ConnectionError(f"{self.tracking_uri} does not answer")
                client = client or client_for(self.tracking_uri)
                self._send_some(client)
                if self._down_since is not None:
                    log.warning(
                        "MLflow tracking at %s is back after %.0f s; buffered data delivered",
                        self.tracking_uri, time.monotonic() - self._down_since,
                    )
                    self._down_since = None
                delay = _RETRY_MIN_S
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()
            except Exception as exc:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "MLflow tracking at %s failed (%s: %s); training continues, logging is "
                        "buffered and retried",
                        self.tracking_uri, type(exc).__name__, _first_line(exc),
                    )
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()
                    if self._closed and time.monotonic() - self._closed_at > _GIVE_UP_AFTER_END_S:
                        log.warning(
                            "MLflow run %s: giving up on %d undelivered items for %s (the run "
                            "directory keeps its own metrics log and images)",
                            self.run_id, self._buffer.size(), self.tracking_uri,
                        )
                        self._buffer = _Buffer()
                        self._cond.notify_all()
                        return
                # Back off for the full delay: new log calls must not turn it into a busy loop.
                time.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    def _send_some(self, client) -> None:
        """Send one slice of the buffer; remove it from the buffer only once the store took it
        (or refused it for good), so a failure part-way leaves it to be sent again."""
        from mlflow.entities import Param, RunTag

        def log_params(items):
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in items], synchronous=True)

        def log_tags(items):
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in items], synchronous=True)

        with self._cond:
            params = list(self._buffer.params.items())[:_MAX_PARAMS_TAGS_PER_BATCH]
        if params:
            self._deliver(params, log_params, "params")
            with self._cond:
                for k, _ in params:
                    self._buffer.params.pop(k, None)
            return
        with self._cond:
            tags = list(self._buffer.tags.items())[:_MAX_PARAMS_TAGS_PER_BATCH]
        if tags:
            self._deliver(tags, log_tags, "tags")
            with self._cond:
                for k, v in tags:
                    if self._buffer.tags.get(k) == v:
                        self._buffer.tags.pop(k)
            return
        with self._cond:
            metrics = self._buffer.metrics[:_MAX_METRICS_PER_BATCH]
            self._inflight_metrics = len(metrics)
        if metrics:
            try:
                fresh = self._not_yet_logged(client, metrics)
                delivered = self._deliver(
                    fresh, lambda items: client.log_batch(self.run_id, metrics=items, synchronous=True),
                    "metrics",
                ) if fresh else []
            except Exception:
                with self._cond:
                    self._inflight_metrics = 0
                raise
            for m in delivered:
                self._logged_steps[m.key].add(m.step)
            with self._cond:
                # The in-flight slice stays at the front: log_metrics drops only after it.
                del self._buffer.metrics[: len(metrics)]
                self._inflight_metrics = 0
                self._delivered_metrics += len(delivered)
            return
        with self._cond:
            artifact = self._buffer.artifacts[0] if self._buffer.artifacts else None
        if artifact is not None:
            local, artifact_dir, only_if_missing = artifact

            def upload(_items):
                present = set()
                if only_if_missing:
                    present = {Path(a.path).name for a in client.list_artifacts(self.run_id, artifact_dir)}
                if local.name not in present:
                    client.log_artifact(self.run_id, str(local), artifact_path=artifact_dir)

            self._deliver([local], upload, f"file {local.name}")
            with self._cond:
                self._buffer.artifacts.pop(0)
            shutil.rmtree(local.parent, ignore_errors=True)
            return
        with self._cond:
            status = self._buffer.terminate
        if status:
            self._deliver([status], lambda _: client.set_terminated(self.run_id, status=status), "status")
            with self._cond:
                if self._buffer.terminate == status:
                    self._buffer.terminate = None

    def _deliver(self, items: list, send, what: str) -> list:
        """send(items); the items the store took. A store that is away raises (retried later);
        one that refuses an item for good (an invalid value, a deleted run) must not block
        everything queued behind it: the refused items are dropped with a warning."""
        try:
            send(items)
            return items
        except Exception as exc:
            if not _refused(exc):
                raise
            if len(items) == 1:
                log.warning("MLflow run %s: the store refused %s %s (%s); dropped",
                            self.run_id, what, _short(items[0]), _first_line(exc))
                return []
        delivered = []
        for item in items:  # find the bad ones
            delivered += self._deliver([item], send, what)
        return delivered

    def _not_yet_logged(self, client, metrics: list) -> list:
        """One point per (metric, step) in a run: a restarted worker trains the steps after its
        checkpoint again (to the same values: resume is exact), and those must not show twice in
        the history. What the run already has is read once per key."""
        for key in {m.key for m in metrics} - set(self._logged_steps):
            self._logged_steps[key] = {m.step for m in client.get_metric_history(self.run_id, key)}
        fresh, seen = [], set()
        for m in metrics:
            if m.step in self._logged_steps[m.key] or (m.key, m.step) in seen:
                continue
            seen.add((m.key, m.step))
            fresh.append(m)
        return fresh

    def __repr__(self) -> str:
        return f"RunTracker(run_id={self.run_id!r}, tracking_uri={self.tracking_uri!r})"


def _refused(exc: BaseException) -> bool:
    """The store understood the request and said no (4xx): retrying will not help."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    try:
        status = int(exc.get_http_status_code())
    except Exception:
        return False
    return 400 <= status < 500 and status not in (408, 429)


def _short(item: Any) -> str:
    text = repr(item)
    return text if len(text) <= 120 else text[:117] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def read_run_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The run id / tracking URI the driver recorded for this training run directory."""
    path = Path(run_dir) / RUN_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@atexit.register
def _flush_at_exit() -> None:
    # A process that ends without calling flush/end still gets a short chance to deliver.
    for tracker in list(_LIVE):
        if tracker.enabled and not tracker._closed:
            try:
                tracker.flush(timeout_s=10.0)
            except Exception:
                pass
