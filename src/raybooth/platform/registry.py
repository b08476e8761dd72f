"""The MLflow model registry: registering a trained model, and `models:/NAME@ALIAS` /
`models:/NAME/VERSION` as a model reference everywhere (`generate`, `inpaint`, training's base
`model`, Serve).

A registered version holds an MLflow pyfunc model (raybooth.platform.mlflow_model): the diffusers
pipeline directory (full fine-tuning) or a LoRA adapter plus the base model's reference. Resolving
a reference downloads the version once into `$RAYBOOTH_HOME/models/mlflow/` (versions are
immutable, so the cache never goes stale) and returns a local diffusers directory — for LoRA, the
base model's directory with `lora_path` set.

Aliases, not the deprecated stages: training registers each model under `tracking.alias`
(default `candidate`); `raybooth models promote NAME VERSION --alias champion` moves an alias.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from raybooth.platform.config import ModelOptions, TrainConfig
from raybooth.platform.errors import ModelError, UserError
from raybooth.platform.paths import models_dir
from raybooth.platform.tracking import client_for, resolve_tracking_uri, server_reachable

log = logging.getLogger("raybooth.registry")

MODELS_PREFIX = "models:/"
MODEL_ARTIFACT_NAME = "model"
_ALIAS = re.compile(r"^[A-Za-z0-9_\-]+$")
_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")


# ---------------------------------------------------------------------------------------------
# References


@dataclass(frozen=True)
class RegistryRef:
    name: str
    alias: str | None = None
    version: str | None = None  # a number, or "latest"

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_ref(ref: str) -> RegistryRef:
    m = _REF.match(ref.strip())
    if not m:
        raise ModelError(
            f"model {ref!r}: a registry reference is models:/NAME@ALIAS (e.g. "
            "models:/demo-subject@champion) or models:/NAME/VERSION (e.g. models:/demo-subject/3)",
            field="model",
        )
    version = m["version"]
    if version is not None and not (version.isdigit() or version == "latest"):
        raise ModelError(
            f"model {ref!r}: the version must be a number or 'latest' (got {version!r}); "
            "for an alias write models:/NAME@ALIAS",
            field="model",
        )
    return RegistryRef(name=m["name"], alias=m["alias"], version=version)


def check_alias(alias: str, field: str = "alias") -> str:
    if not _ALIAS.match(alias or "") or alias == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise UserError(
            f"alias {alias!r}: use letters, digits, '_' and '-' (and not 'latest' or 'v<number>', "
            "which MLflow reserves), e.g. 'champion' or 'candidate'",
            field=field,
        )
    return alias


def _unreachable(uri: str) -> ModelError:
    return ModelError(
        f"the MLflow tracking server {uri} does not answer. Start it, or point "
        "MLFLOW_TRACKING_URI (tracking.tracking_uri in a config) at one that runs",
        field="model",
    )


def _version_of(client, ref: RegistryRef, uri: str):
    """The ModelVersion a reference names, or a ModelError that says what does exist."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(ref.name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=20)]
        known = f"registered models: {', '.join(names)}" if names else "no model is registered yet"
        raise ModelError(
            f"model {str(ref)!r}: there is no registered model {ref.name!r} in {uri} ({known}). "
            "Train with tracking.register_as set, or list models with `raybooth models list`",
            field="model",
        ) from None
    versions = sorted(
        (v for v in client.search_model_versions(f"name='{_quote(ref.name)}'")),
        key=lambda v: int(v.version),
    )
    if ref.alias:
        if ref.alias not in model.aliases:
            have = ", ".join(f"@{a} -> v{v}" for a, v in sorted(model.aliases.items())) or "none"
            raise ModelError(
                f"model {str(ref)!r}: {ref.name!r} has no alias {ref.alias!r} (aliases: {have}). "
                f"Set it with `raybooth models promote {ref.name} VERSION --alias {ref.alias}`",
                field="model",
            )
        return client.get_model_version(ref.name, str(model.aliases[ref.alias]))
    if ref.version == "latest":
        if not versions:
            raise ModelError(f"model {str(ref)!r}: {ref.name!r} has no versions", field="model")
        return versions[-1]
    match = [v for v in versions if str(v.version) == str(int(ref.version))]
    if not match:
        have = ", ".join(str(v.version) for v in versions) or "none"
        raise ModelError(
            f"model {str(ref)!r}: {ref.name!r} has no version {ref.version} (versions: {have})",
            field="model",
        )
    return match[0]


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _cache_dir(uri: str, mv) -> Path:
    store = hashlib.sha256(uri.encode()).hexdigest()[:12]
    stamp = mv.creation_timestamp or 0
    return models_dir() / "mlflow" / store / _safe(mv.name) / f"v{mv.version}-{stamp}"


def download_version(uri: str, mv) -> Path:
    """The version's MLflow model directory in the local cache (downloaded once; atomic, so
    several Serve replicas or Ray workers may race to fetch it)."""
    import mlflow.artifacts

    target = _cache_dir(uri, mv)
    if (target / "MLmodel").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # MLflow 3 drops the explicit registry_uri somewhere below download_artifacts and falls
        # back to the process default (./mlflow.db when MLFLOW_TRACKING_URI is unset): pin the
        # global store for the call too.
        with fluent_store(uri):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{mv.name}/{mv.version}",
                dst_path=str(tmp),
                tracking_uri=uri,
                registry_uri=uri,
            )
        local = Path(local)
        if not (local / "MLmodel").is_file():
            raise ModelError(
                f"registered model {mv.name} version {mv.version} is not an MLflow model "
                f"(no MLmodel file in {mv.source})",
                field="model",
            )
        try:
            os.rename(local, target)
        except OSError:
            if not (target / "MLmodel").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _artifact_paths(model_dir: Path) -> dict[str, Path]:
    """The pyfunc model's named artifacts (`pipeline` / `lora` / `raybooth`) as local paths."""
    import yaml

    spec = yaml.safe_load((model_dir / "MLmodel").read_text())
    pyfunc = (spec.get("flavors") or {}).get("python_function") or {}
    out = {}
    for key, entry in (pyfunc.get("artifacts") or {}).items():
        out[key] = model_dir / entry["path"]
    return out


def resolve_registered_model(ref: str, options: ModelOptions) -> "ResolvedModel":  # noqa: F821
    """`models:/NAME@ALIAS` / `models:/NAME/VERSION` -> a ResolvedModel on local disk."""
    from raybooth.platform.mlflow_model import ARTIFACT_INFO, ARTIFACT_LORA, ARTIFACT_PIPELINE
    from raybooth.platform.models import ResolvedModel, refuse_pickle, resolve_model

    parsed = parse_ref(ref)
    uri = resolve_tracking_uri(None)
    if not server_reachable(uri):
        raise _unreachable(uri)
    client = client_for(uri)
    mv = _version_of(client, parsed, uri)
    try:
        model_dir = download_version(uri, mv)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"model {ref!r}: could not download version {mv.version} from {uri}: {exc}", field="model"
        ) from None
    artifacts = _artifact_paths(model_dir)
    info_path = artifacts.get(ARTIFACT_INFO)
    if info_path is None or not info_path.is_file():
        raise ModelError(
            f"model {ref!r} (version {mv.version}) was not logged by raybooth: its MLflow model "
            "has no raybooth_model.json artifact",
            field="model",
        )
    info = json.loads(info_path.read_text())
    extra = {
        "registered_model": mv.name,
        "registered_version": str(mv.version),
        "mlflow_run_id": mv.run_id,
        "train_mode": info.get("mode"),
    }
    if info.get("mode") == "lora":
        base_ref = info["base_model"]
        base_options = options.model_copy(update={"revision": info.get("base_revision")})
        base = resolve_model(base_ref, base_options)
        return replace(
            base,
            ref=ref,
            kind="mlflow",
            revision=str(mv.version),
            lora_path=artifacts[ARTIFACT_LORA],
            extra={**base.extra, **extra, "base_model": base_ref, "base_model_path": str(base.path)},
        )
    path = artifacts[ARTIFACT_PIPELINE]
    refuse_pickle(path, options.allow_pickle)
    return ResolvedModel(
        ref=ref,
        kind="mlflow",
        path=path,
        revision=str(mv.version),
        variant=options.variant,
        allow_pickle=options.allow_pickle,
        extra=extra,
    )


# ---------------------------------------------------------------------------------------------
# Logging and registering a trained model


@contextlib.contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """mlflow.pyfunc.log_model works through MLflow's process-global "fluent" state (and
    `set_tracking_uri` also writes $MLFLOW_TRACKING_URI); point it at our store for the call and
    then put back exactly what the process had, so later env-based lookups are not pinned."""
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


class _PyfuncFlavor:
    """mlflow.pyfunc as the flavor for Model.log, minus the `validate_serving_input` switch that
    Model.log also hands on to the flavor's save_model (which does not accept it)."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(**kwargs):
        import mlflow.pyfunc

        kwargs.pop("validate_serving_input", None)
        return mlflow.pyfunc.save_model(**kwargs)


def model_info(config: TrainConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """raybooth_model.json: what the pyfunc model needs to load and what a reader wants to see."""
    mode = summary.get("mode") or config.train.mode
    info: dict[str, Any] = {
        "mode": mode,
        "base_model": summary.get("base_model") or config.model,
        "base_revision": config.model_options.revision,
        "default_steps": config.train.validation_steps,
        "default_guidance_scale": 7.5,
        "resolution": config.train.resolution,
        "instance_prompt": config.subject.instance_prompt,
        "identifier": config.subject.identifier,
        "class_prompt": config.subject.class_prompt,
        "steps": summary.get("steps"),
    }
    if mode == "lora":
        from raybooth.platform.lora import read_lora_metadata

        meta = read_lora_metadata(summary["lora_path"])
        info["base_model"] = meta.get("base_model") or info["base_model"]
        info["base_revision"] = meta.get("base_revision") or info["base_revision"]
        base, revision = str(info["base_model"]), str(info.get("base_revision") or "")
        if base.startswith(MODELS_PREFIX) and revision.isdigit():
            # An adapter fits the exact weights it was trained on: pin the registry version
            # rather than an alias that may move on.
            info["base_model"] = f"{MODELS_PREFIX}{parse_ref(base).name}/{revision}"
            info["base_revision"] = None
        elif os.path.isabs(os.path.expanduser(base)) or base.startswith("."):
            log.warning(
                "LoRA base model %s is a local folder: the registered model loads only where "
                "that folder exists (register the base model too, or train on a Hub id)", base,
            )
    return info


def _check_export(summary: dict[str, Any], mode: str) -> dict[str, Path]:
    if mode == "lora":
        path = Path(summary.get("lora_path") or summary.get("model_path") or "")
        if not (path / "pytorch_lora_weights.safetensors").is_file():
            raise UserError(f"LoRA export {path} has no pytorch_lora_weights.safetensors", field="lora_path")
        return {"lora": path}
    path = Path(summary.get("model_path") or "")
    if not (path / "model_index.json").is_file():
        raise UserError(f"model export {path} is not a diffusers pipeline directory", field="model_path")
    return {"pipeline": path}


def _version_tags(config: TrainConfig, run_id: str, summary: dict, metrics: dict) -> dict[str, str]:
    tags = {
        "subject": config.subject.identifier,
        "instance_prompt": config.subject.instance_prompt,
        "class_prompt": config.subject.class_prompt,
        "run_id": run_id,
        "mode": summary.get("mode") or config.train.mode,
        "base_model": str(summary.get("base_model") or config.model),
        "steps": str(summary.get("steps")),
    }
    if summary.get("final_loss") is not None:
        tags["final_loss"] = f"{float(summary['final_loss']):.6g}"
    if summary.get("class_image_set"):
        tags["class_image_set"] = str(summary["class_image_set"])
    for key, value in metrics.items():
        tags[f"metric.{key}"] = f"{value:.6g}"
    return tags


def log_and_register(
    config: TrainConfig, run_id: str, summary: dict[str, Any], *, wait_s: float = 60.0
) -> dict[str, Any]:
    """Log the exported model as a pyfunc model on `run_id`, register it as
    `tracking.register_as` and point `tracking.alias` at the new version.

    Returns {"registered_model", "registered_version", "alias", "model_uri"}. A store that does
    not answer within `wait_s` does not fail the finished training: the result then has None
    values and a "registration_error" (the model is still on disk, in the run directory).
    """
    import mlflow.pyfunc
    from mlflow.models import Model

    from raybooth.platform.mlflow_model import (
        ARTIFACT_INFO,
        RayboothDiffusionModel,
        input_example,
        package_code_path,
        pip_requirements,
        signature,
    )

    name = config.tracking.register_as
    alias = check_alias(config.tracking.alias, field="tracking.alias")
    mode = summary.get("mode") or config.train.mode
    exported = _check_export(summary, mode)
    uri = resolve_tracking_uri(config.tracking.tracking_uri)
    result: dict[str, Any] = {"registered_model": None, "registered_version": None, "alias": None,
                              "model_uri": None}
    deadline = time.monotonic() + wait_s
    while not server_reachable(uri):
        if time.monotonic() > deadline:
            msg = f"MLflow tracking server {uri} did not answer for {wait_s:.0f} s"
            log.warning("model not registered: %s; the exported model stays on disk", msg)
            return {**result, "registration_error": msg}
        time.sleep(2.0)
    client = client_for(uri)
    try:
        run = client.get_run(run_id)
        # The summary's final metrics come from the run directory's own log: complete even when
        # the run's last points are still on their way to a store that was away.
        metrics = {**run.data.metrics, **{k: float(v) for k, v in (summary.get("final_metrics") or {}).items()
                                          if isinstance(v, (int, float))}}
        with tempfile.TemporaryDirectory(prefix="raybooth-model-") as tmp:
            info_path = Path(tmp) / "raybooth_model.json"
            info_path.write_text(json.dumps(model_info(config, summary), indent=2, default=str))
            artifacts = {ARTIFACT_INFO: str(info_path), **{k: str(v) for k, v in exported.items()}}
            with fluent_store(uri):
                # The logged model belongs to the run's experiment (so its files go to that
                # experiment's artifact root), not to whatever experiment the process has active.
                pending = mlflow.initialize_logged_model(
                    name=MODEL_ARTIFACT_NAME, source_run_id=run_id,
                    experiment_id=run.info.experiment_id, params=dict(run.data.params),
                    tags={"raybooth.mode": mode},
                )
                # Model.log is what mlflow.pyfunc.log_model calls, plus switches: `run_id` and
                # `model_id` (log onto the training run without making it the active run) and
                # `validate_serving_input=False` — that check loads the whole pipeline and
                # runs a generation on the driver, minutes on a CPU for a real model; the tests
                # run predict() instead.
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
                    registered_model_name=name,
                    validate_serving_input=False,
                )
        result["model_uri"] = logged.model_uri
        if name:
            version = str(logged.registered_model_version)
            client.set_registered_model_alias(name, alias, version)
            for key, value in _version_tags(config, run_id, summary, metrics).items():
                client.set_model_version_tag(name, version, key, value)
            client.set_tag(run_id, "raybooth.registered_model", f"{name}/{version}")
            result.update(registered_model=name, registered_version=version, alias=alias,
                          model_uri=f"models:/{name}@{alias}")
    except UserError:
        raise
    except Exception as exc:
        log.warning("model not registered in %s: %s: %s (the exported model stays on disk)",
                    uri, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return {**result, "registration_error": f"{type(exc).__name__}: {exc}"}
    return result


# ---------------------------------------------------------------------------------------------
# Listing and promoting (the `raybooth models` commands)


def list_models(uri: str | None = None) -> list[dict[str, Any]]:
    """Every registered model with its versions, aliases and the metrics tagged on each version."""
    uri = resolve_tracking_uri(uri)
    if not server_reachable(uri):
        raise _unreachable(uri)
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
            for mv in sorted(client.search_model_versions(f"name='{_quote(model.name)}'"),
                             key=lambda v: int(v.version)):
                tags = dict(mv.tags or {})
                versions.append({
                    "version": str(mv.version),
                    "aliases": sorted(by_version.get(str(mv.version), [])),
                    "run_id": mv.run_id,
                    "created": mv.creation_timestamp,
                    "metrics": {k.removeprefix("metric."): v for k, v in tags.items()
                                if k.startswith("metric.")},
                    "tags": {k: v for k, v in tags.items() if not k.startswith("metric.")},
                })
            out.append({"name": model.name, "versions": versions,
                        "aliases": {a: str(v) for a, v in sorted(model.aliases.items())}})
        token = page.token
        if not token:
            break
    return sorted(out, key=lambda m: m["name"])


def promote(name: str, version: str, alias: str, uri: str | None = None) -> dict[str, Any]:
    """Point `alias` at `version` of model `name` (the version it pointed at before is returned)."""
    check_alias(alias)
    uri = resolve_tracking_uri(uri)
    if not server_reachable(uri):
        raise _unreachable(uri)
    client = client_for(uri)
    if not str(version).isdigit():
        raise UserError(f"version must be a number (got {version!r})", field="version")
    mv = _version_of(client, RegistryRef(name=name, version=str(version)), uri)
    previous = client.get_registered_model(name).aliases.get(alias)
    client.set_registered_model_alias(name, alias, str(mv.version))
    return {"name": name, "alias": alias, "version": str(mv.version),
            "previous_version": str(previous) if previous is not None else None,
            "model_uri": f"models:/{name}@{alias}"}
