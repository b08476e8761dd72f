"""Where MLflow data goes: the tracking URI, a client for it, and whether it answers.

The URI is the config's `tracking.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else the embedded
store: `sqlite:///$RAYBOOTH_HOME/mlflow.db` with artifacts in `$RAYBOOTH_HOME/mlartifacts` (nothing
to start on one machine; `raybooth mlflow-ui` opens it). Tracking and the model registry always
use the same store.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from raybooth.platform.paths import raybooth_home

SQLITE_PREFIX = "sqlite:///"
HEALTH_TIMEOUT_S = 3.0


def embedded_tracking_uri() -> str:
    return f"{SQLITE_PREFIX}{raybooth_home() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return env or embedded_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (None for anything else)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(unquote(uri[len(SQLITE_PREFIX) :]))


def default_artifact_root(uri: str) -> str | None:
    """For a SQLite store: `<dir of the .db>/mlartifacts` (the embedded default puts artifacts in
    $RAYBOOTH_HOME/mlartifacts). For a server, None: the server decides (e.g. proxied to S3)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / "mlartifacts").resolve().as_uri()


def is_http(uri: str) -> bool:
    return urlparse(uri).scheme in {"http", "https"}


def server_reachable(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
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
    location = f"{root}/{safe_name(name)}" if root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        # Another process created it between our lookup and create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def safe_name(name: str, fallback: str = "experiment") -> str:
    """`name` as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or fallback


def refused(exc: BaseException) -> bool:
    """The store understood the request and said no (4xx): retrying will not help."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    try:
        status = int(exc.get_http_status_code())
    except Exception:
        return False
    return 400 <= status < 500 and status not in (408, 429)


@contextlib.contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """Some MLflow calls (pyfunc.load_model, Model.log, artifact downloads) work through MLflow's
    process-global "fluent" state (and `set_tracking_uri` also writes $MLFLOW_TRACKING_URI); point
    it at our store for the call and then put back exactly what the process had, so later
    env-based lookups are not pinned."""
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_state
    import mlflow.tracking._tracking_service.utils as tracking_state

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved_tracking = getattr(tracking_state, "_tracking_uri", None)
    saved_registry = getattr(registry_state, "_registry_uri", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_state._tracking_uri = saved_tracking
        registry_state._registry_uri = saved_registry
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
