"""`models:/NAME@ALIAS` and `models:/NAME/VERSION`: a model in the MLflow registry as a model
reference (`generate`, `inpaint`, training's base `model`, Serve).

A registered raybooth version is an MLflow pyfunc model (raybooth.platform.mlflow.pyfunc) whose
artifacts are `raybooth` (raybooth_model.json, read as `ModelInfo`) and either `pipeline` (a
diffusers directory, full fine-tuning) or `lora` (an adapter whose base model is a reference).
`resolve_registered` downloads a version once into `$RAYBOOTH_HOME/models/mlflow/` (versions are
immutable, so the cache never goes stale) and says where its files are; raybooth.platform.models
turns that into a loadable model. Nothing here imports pipeline code: the model loader imports
this module, never the reverse.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from raybooth.platform.errors import ModelError
from raybooth.platform.mlflow.store import (
    client_for,
    fluent_store,
    resolve_tracking_uri,
    safe_name,
    server_reachable,
)
from raybooth.platform.paths import models_dir, publish_dir

MODELS_PREFIX = "models:/"
# The named artifacts of a registered raybooth model (its pyfunc `artifacts`).
ARTIFACT_PIPELINE = "pipeline"
ARTIFACT_LORA = "lora"
ARTIFACT_INFO = "raybooth"
MODEL_INFO_NAME = "raybooth_model.json"

_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")


@dataclass(frozen=True)
class RegistryRef:
    name: str
    alias: str | None = None
    version: str | None = None  # a number, or "latest"

    def __str__(self) -> str:
        return model_uri(self.name, alias=self.alias) if self.alias else model_uri(self.name, version=self.version)


def model_uri(name: str, *, alias: str | None = None, version: str | int | None = None) -> str:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    return f"{MODELS_PREFIX}{name}@{alias}" if alias else f"{MODELS_PREFIX}{name}/{version}"


def is_registry_ref(ref: str) -> bool:
    return ref.startswith(MODELS_PREFIX)


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


@dataclass(frozen=True)
class ModelInfo:
    """raybooth_model.json: what loading a registered model needs, and what a reader wants to see."""

    mode: str  # full | lora
    base_model: str  # the reference the model was trained from (for LoRA: what it loads onto)
    base_revision: str | None = None
    default_steps: int | None = None
    default_guidance_scale: float | None = None
    resolution: int | None = None
    instance_prompt: str | None = None
    identifier: str | None = None
    class_prompt: str | None = None
    steps: int | None = None  # training steps

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class RegisteredFiles:
    """A registered version on local disk: its info, and the pipeline or the adapter folder."""

    ref: str
    name: str
    version: str
    run_id: str | None
    info: ModelInfo
    pipeline: Path | None  # full mode
    lora: Path | None  # LoRA mode (the base is `info.base_model` at `info.base_revision`)


def unreachable(uri: str) -> ModelError:
    return ModelError(
        f"the MLflow tracking server {uri} does not answer. Start it, or point "
        "MLFLOW_TRACKING_URI (tracking.tracking_uri in a config) at one that runs",
        field="model",
    )


def quote(name: str) -> str:
    """A model name inside a search filter string."""
    return name.replace("'", "\\'")


def version_of(client, ref: RegistryRef, uri: str):
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
    versions = sorted(client.search_model_versions(f"name='{quote(ref.name)}'"), key=lambda v: int(v.version))
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


def _cache_dir(uri: str, mv) -> Path:
    store = hashlib.sha256(uri.encode()).hexdigest()[:12]
    stamp = mv.creation_timestamp or 0
    return models_dir() / "mlflow" / store / safe_name(mv.name, "model") / f"v{mv.version}-{stamp}"


def download_version(uri: str, mv) -> Path:
    """The version's MLflow model directory in the local cache (downloaded once; built beside
    and renamed into place, so several Serve replicas or Ray workers may race to fetch it)."""
    import mlflow.artifacts

    target = _cache_dir(uri, mv)
    if (target / "MLmodel").is_file():
        return target
    with publish_dir(target) as out, tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        # MLflow 3 drops the explicit registry_uri somewhere below download_artifacts and falls
        # back to the process default (./mlflow.db when MLFLOW_TRACKING_URI is unset): pin the
        # global store for the call too.
        with fluent_store(uri):
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri(mv.name, version=mv.version),
                dst_path=scratch,
                tracking_uri=uri,
                registry_uri=uri,
            ))
        if not (local / "MLmodel").is_file():
            raise ModelError(
                f"registered model {mv.name} version {mv.version} is not an MLflow model "
                f"(no MLmodel file in {mv.source})",
                field="model",
            )
        for item in local.iterdir():
            shutil.move(str(item), out / item.name)
    return target


def artifact_paths(model_dir: Path) -> dict[str, Path]:
    """The pyfunc model's named artifacts (`pipeline` / `lora` / `raybooth`) as local paths."""
    import yaml

    spec = yaml.safe_load((model_dir / "MLmodel").read_text())
    pyfunc = (spec.get("flavors") or {}).get("python_function") or {}
    return {key: model_dir / entry["path"] for key, entry in (pyfunc.get("artifacts") or {}).items()}


def read_model_info(path: Path) -> ModelInfo:
    import json

    return ModelInfo.from_json(json.loads(Path(path).read_text()))


def resolve_registered(ref: str, tracking_uri: str | None = None) -> RegisteredFiles:
    """`models:/NAME@ALIAS` / `models:/NAME/VERSION` -> the version's files on local disk."""
    parsed = parse_ref(ref)
    uri = resolve_tracking_uri(tracking_uri)
    if not server_reachable(uri):
        raise unreachable(uri)
    mv = version_of(client_for(uri), parsed, uri)
    try:
        model_dir = download_version(uri, mv)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"model {ref!r}: could not download version {mv.version} from {uri}: {exc}", field="model"
        ) from None
    artifacts = artifact_paths(model_dir)
    info_path = artifacts.get(ARTIFACT_INFO)
    if info_path is None or not info_path.is_file():
        raise ModelError(
            f"model {ref!r} (version {mv.version}) was not logged by raybooth: its MLflow model "
            f"has no {MODEL_INFO_NAME} artifact",
            field="model",
        )
    info = read_model_info(info_path)
    return RegisteredFiles(
        ref=ref, name=mv.name, version=str(mv.version), run_id=mv.run_id, info=info,
        pipeline=artifacts.get(ARTIFACT_PIPELINE) if info.mode != "lora" else None,
        lora=artifacts.get(ARTIFACT_LORA) if info.mode == "lora" else None,
    )
