"""The MLflow model registry: log a model folder as a raybooth pyfunc model on a run, register it
as a version, move aliases, list what is registered.

Aliases, not the deprecated stages: a new version gets an alias (training uses `tracking.alias`,
default `candidate`); `raybooth models promote NAME VERSION --alias champion` moves one.
Reading a registered model back is raybooth.platform.mlflow.refs.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raybooth.platform.errors import UserError
from raybooth.platform.lora import WEIGHTS_NAME
from raybooth.platform.mlflow.refs import (
    ARTIFACT_INFO,
    ARTIFACT_LORA,
    ARTIFACT_PIPELINE,
    MODEL_INFO_NAME,
    ModelInfo,
    RegistryRef,
    model_uri,
    quote,
    unreachable,
    version_of,
)
from raybooth.platform.mlflow.sender import first_line
from raybooth.platform.mlflow.store import (
    client_for,
    fluent_store,
    resolve_tracking_uri,
    server_reachable,
)

log = logging.getLogger("raybooth.mlflow")

MODEL_ARTIFACT_NAME = "model"
# A version carries its run's final metrics as tags `metric.<name>` (`raybooth models list`).
METRIC_TAG_PREFIX = "metric."
_ALIAS = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_alias(alias: str, field: str = "alias") -> str:
    if not _ALIAS.match(alias or "") or alias == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise UserError(
            f"alias {alias!r}: use letters, digits, '_' and '-' (and not 'latest' or 'v<number>', "
            "which MLflow reserves), e.g. 'champion' or 'candidate'",
            field=field,
        )
    return alias


@dataclass(frozen=True)
class Registration:
    """What registering a model did. `error` set (and the rest None) when the store did not take
    it: the model folder is still on disk, nothing is lost."""

    registered_model: str | None = None
    registered_version: str | None = None
    alias: str | None = None
    model_uri: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Registration:
        return cls(**data)


@dataclass(frozen=True)
class Promotion:
    name: str
    alias: str
    version: str
    previous_version: str | None
    model_uri: str


def model_artifacts(info: ModelInfo, model_dir: str | Path) -> dict[str, Path]:
    """The named artifacts for a model folder: `lora` (an adapter) or `pipeline` (diffusers)."""
    path = Path(model_dir)
    if info.mode == "lora":
        if not (path / WEIGHTS_NAME).is_file():
            raise UserError(f"LoRA export {path} has no {WEIGHTS_NAME}", field="lora_path")
        return {ARTIFACT_LORA: path}
    if not (path / "model_index.json").is_file():
        raise UserError(f"model export {path} is not a diffusers pipeline directory", field="model_path")
    return {ARTIFACT_PIPELINE: path}


class _PyfuncFlavor:
    """mlflow.pyfunc as the flavor for Model.log, minus the `validate_serving_input` switch that
    Model.log also hands on to the flavor's save_model (which does not accept it)."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(**kwargs):
        import mlflow.pyfunc

        kwargs.pop("validate_serving_input", None)
        return mlflow.pyfunc.save_model(**kwargs)


def _wait_for(uri: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while not server_reachable(uri):
        if time.monotonic() > deadline:
            return False
        time.sleep(2.0)
    return True


def log_and_register(
    *,
    tracking_uri: str | None,
    run_id: str,
    name: str | None,
    alias: str,
    info: ModelInfo,
    model_dir: str | Path,
    version_tags: dict[str, str],
    metrics: dict[str, float] | None = None,
    wait_s: float = 60.0,
) -> Registration:
    """Log `model_dir` as a pyfunc model on `run_id`; with a `name`, register it, point `alias`
    at the new version and tag the version with `version_tags` and with the run's metrics
    (`metrics` override the run's own: a caller may know final values the store has not got yet).

    A store that does not answer within `wait_s`, or fails, does not raise: the Registration then
    carries `error`. A model folder that is not what `info.mode` says raises UserError.
    """
    import mlflow
    from mlflow.models import Model

    from raybooth.platform.mlflow.pyfunc import (
        RayboothDiffusionModel,
        input_example,
        package_code_path,
        pip_requirements,
        signature,
    )

    if name:
        alias = check_alias(alias, field="tracking.alias")
    exported = model_artifacts(info, model_dir)
    uri = resolve_tracking_uri(tracking_uri)
    if not _wait_for(uri, wait_s):
        msg = f"MLflow tracking server {uri} did not answer for {wait_s:.0f} s"
        log.warning("model not registered: %s; the exported model stays on disk", msg)
        return Registration(error=msg)
    client = client_for(uri)
    try:
        run = client.get_run(run_id)
        with tempfile.TemporaryDirectory(prefix="raybooth-model-") as tmp:
            info_path = Path(tmp) / MODEL_INFO_NAME
            info_path.write_text(json.dumps(info.to_json(), indent=2, default=str))
            artifacts = {ARTIFACT_INFO: str(info_path), **{k: str(v) for k, v in exported.items()}}
            with fluent_store(uri):
                # The logged model belongs to the run's experiment (so its files go to that
                # experiment's artifact root), not to whatever experiment the process has active.
                pending = mlflow.initialize_logged_model(
                    name=MODEL_ARTIFACT_NAME, source_run_id=run_id,
                    experiment_id=run.info.experiment_id, params=dict(run.data.params),
                    tags={"raybooth.mode": info.mode},
                )
                # Model.log is what mlflow.pyfunc.log_model calls, plus switches: `run_id` and
                # `model_id` (log onto the run without making it the active run) and
                # `validate_serving_input=False` — that check loads the whole pipeline and runs a
                # generation on the driver, minutes on a CPU for a real model; the tests run
                # predict() instead.
                logged = Model.log(
                    model_id=pending.model_id,
                    artifact_path=None,
                    name=MODEL_ARTIFACT_NAME,
                    flavor=_PyfuncFlavor,
                    run_id=run_id,
                    python_model=RayboothDiffusionModel(),
                    artifacts=artifacts,
                    code_paths=[package_code_path()],
                    signature=signature(),
                    input_example=input_example(),
                    pip_requirements=pip_requirements(),
                    registered_model_name=name or None,
                    validate_serving_input=False,
                )
        if not name:
            return Registration(model_uri=logged.model_uri)
        version = str(logged.registered_model_version)
        client.set_registered_model_alias(name, alias, version)
        all_metrics = {**run.data.metrics, **(metrics or {})}
        tags = {**version_tags, **{f"{METRIC_TAG_PREFIX}{k}": f"{v:.6g}" for k, v in all_metrics.items()}}
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_tag(run_id, "raybooth.registered_model", f"{name}/{version}")
        return Registration(registered_model=name, registered_version=version, alias=alias,
                            model_uri=model_uri(name, alias=alias))
    except UserError:
        raise
    except Exception as exc:
        log.warning("model not registered in %s: %s: %s (the exported model stays on disk)",
                    uri, type(exc).__name__, first_line(exc))
        return Registration(error=f"{type(exc).__name__}: {exc}")


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every registered model with its versions, aliases and the metrics tagged on each version
    (JSON-ready: what `raybooth models list --json` prints)."""
    uri = resolve_tracking_uri(tracking_uri)
    if not server_reachable(uri):
        raise unreachable(uri)
    client = client_for(uri)
    out = []
    token = None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        for model in page:
            by_version: dict[str, list[str]] = {}
            for a, v in model.aliases.items():
                by_version.setdefault(str(v), []).append(a)
            versions = []
            for mv in sorted(client.search_model_versions(f"name='{quote(model.name)}'"),
                             key=lambda v: int(v.version)):
                tags = dict(mv.tags or {})
                versions.append({
                    "version": str(mv.version),
                    "aliases": sorted(by_version.get(str(mv.version), [])),
                    "run_id": mv.run_id,
                    "created": mv.creation_timestamp,
                    "metrics": {k.removeprefix(METRIC_TAG_PREFIX): v for k, v in tags.items()
                                if k.startswith(METRIC_TAG_PREFIX)},
                    "tags": {k: v for k, v in tags.items() if not k.startswith(METRIC_TAG_PREFIX)},
                })
            out.append({"name": model.name, "versions": versions,
                        "aliases": {a: str(v) for a, v in sorted(model.aliases.items())}})
        token = page.token
        if not token:
            break
    return sorted(out, key=lambda m: m["name"])


def promote(name: str, version: str, alias: str, tracking_uri: str | None = None) -> Promotion:
    """Point `alias` at `version` of model `name` (the version it pointed at before is returned)."""
    check_alias(alias)
    uri = resolve_tracking_uri(tracking_uri)
    if not server_reachable(uri):
        raise unreachable(uri)
    client = client_for(uri)
    if not str(version).isdigit():
        raise UserError(f"version must be a number (got {version!r})", field="version")
    mv = version_of(client, RegistryRef(name=name, version=str(version)), uri)
    previous = client.get_registered_model(name).aliases.get(alias)
    client.set_registered_model_alias(name, alias, str(mv.version))
    return Promotion(name=name, alias=alias, version=str(mv.version),
                     previous_version=str(previous) if previous is not None else None,
                     model_uri=model_uri(name, alias=alias))
