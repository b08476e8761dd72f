"""Model references: one syntax everywhere (CLI, configs, the HTTP `model` field).

- `tiny`, `tiny-inpainting` — the built-in tiny models (raybooth.platform.tiny)
- `toy`, `toy-inpainting` — the toy world's trained models (raybooth.platform.toy.models)
- a local directory in diffusers layout
- `models:/NAME@ALIAS`, `models:/NAME/VERSION` — the MLflow registry (raybooth.platform.mlflow.refs)
- a Hugging Face Hub id `org/name`, with revision, variant, cache dir and offline mode

`resolve_model` turns a reference into a local diffusers directory (downloading or looking up the
Hub cache as needed) and says which revision it resolved to; `load_components` loads it. Both run
before any GPU work, so a bad reference fails fast with a message that says what to do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from raybooth.platform.config import ModelOptions
from raybooth.platform.errors import ModelError
from raybooth.platform.lora import WEIGHTS_NAME
from raybooth.platform.mlflow.refs import MODELS_PREFIX, resolve_registered
from raybooth.platform.quiet import quiet_libraries
from raybooth.platform.tiny import TINY_BUILD, TINY_NAMES, tiny_model_path
from raybooth.platform.toy.models import TOY_NAMES, toy_build, toy_model_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
ALLOW_PICKLE_HINT = (
    "Pickle files can run arbitrary code when loaded, so raybooth loads safetensors only. If you "
    "trust this model, opt in with `model_options.allow_pickle: true` in the config (CLI: "
    "--allow-pickle), or convert it to safetensors."
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made concrete: a local diffusers directory and where it came from."""

    ref: str
    kind: str  # tiny | toy | local | hub | mlflow
    path: Path
    revision: str | None = None  # Hub commit, registry version, or tiny build
    variant: str | None = None
    allow_pickle: bool = False
    # A registered LoRA model resolves to its base pipeline plus the adapter directory.
    lora_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.ref,
            "model_kind": self.kind,
            "model_path": str(self.path),
            "model_revision": self.revision,
            "lora": str(self.lora_path) if self.lora_path else None,
            **self.extra,
        }


def hub_offline(options: ModelOptions) -> bool:
    if options.local_files_only is not None:
        return options.local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def check_model_ref(ref: str, field_name: str = "model") -> str:
    """Syntax check only (no I/O): what the HTTP layer runs before a name reaches any loader."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelError("the model reference is empty", field=field_name)
    ref = ref.strip()
    if ref in TINY_NAMES or ref in TOY_NAMES or ref.startswith(MODELS_PREFIX) or HUB_ID.match(ref):
        return ref
    if Path(ref).expanduser().is_dir():
        return ref
    raise ModelError(
        f"model {ref!r} is not a reference raybooth understands: use 'tiny', "
        "'tiny-inpainting', 'toy', 'toy-inpainting', a local diffusers directory, a Hub id like "
        "'stable-diffusion-v1-5/stable-diffusion-v1-5', or 'models:/NAME@ALIAS'",
        field=field_name,
    )


def refuse_pickle(directory: Path, allow_pickle: bool) -> None:
    """Refuse a directory whose weights exist only as pickle files (unless the user opted in)."""
    if allow_pickle:
        return
    for sub in [directory, *[p for p in directory.iterdir() if p.is_dir()]]:
        files = [p.name for p in sub.iterdir() if p.is_file()]
        has_safe = any(n.endswith(".safetensors") for n in files)
        pickles = [n for n in files if n.endswith(PICKLE_SUFFIXES)]
        if pickles and not has_safe:
            raise ModelError(
                f"{sub / pickles[0]} is a pickle checkpoint and there is no .safetensors beside "
                f"it. {ALLOW_PICKLE_HINT}",
                field="model",
            )


def _resolve_local(ref: str, options: ModelOptions) -> ResolvedModel:
    path = Path(ref).expanduser().resolve()
    if not (path / "model_index.json").is_file():
        hint = ""
        if (path / WEIGHTS_NAME).is_file():
            hint = " It holds a LoRA adapter: pass it with --lora and give the base model as --model."
        raise ModelError(
            f"{path} is not a diffusers pipeline directory (no model_index.json).{hint}",
            field="model",
        )
    refuse_pickle(path, options.allow_pickle)
    return ResolvedModel(
        ref=ref, kind="local", path=path, variant=options.variant, allow_pickle=options.allow_pickle
    )


def _resolve_hub(ref: str, options: ModelOptions) -> ResolvedModel:
    from diffusers import DiffusionPipeline

    offline = hub_offline(options)
    try:
        # The same file selection as from_pretrained (components, variant, safetensors only),
        # so a cache laid out for one is found by the other.
        folder = DiffusionPipeline.download(
            ref,
            revision=options.revision,
            variant=options.variant,
            cache_dir=options.cache_dir,
            local_files_only=offline,
            use_safetensors=None if options.allow_pickle else True,
        )
    except Exception as exc:  # hub errors come in many classes; all mean "cannot resolve"
        text = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).rstrip(". ")
        if "safetensors" in text.lower():
            raise ModelError(f"model {ref!r}: {text}. {ALLOW_PICKLE_HINT}", field="model") from None
        where = f" in cache {options.cache_dir}" if options.cache_dir else ""
        if offline:
            advice = (
                f"offline mode is on (HF_HUB_OFFLINE / model_options.local_files_only) and the "
                f"model is not in the Hugging Face cache{where}; download it on a machine with "
                f"network access (`huggingface-cli download {ref}`) or point "
                "model_options.cache_dir at a cache that has it"
            )
        else:
            advice = "check the id, the revision, and your access to the Hub (HF_TOKEN)"
        raise ModelError(f"model {ref!r} could not be resolved: {text}. {advice}.", field="model") from None
    path = Path(folder)
    refuse_pickle(path, options.allow_pickle)
    # In a Hub cache the folder is snapshots/<commit>: that commit is the resolved revision.
    revision = path.name if path.parent.name == "snapshots" else options.revision
    return ResolvedModel(
        ref=ref,
        kind="hub",
        path=path,
        revision=revision,
        variant=options.variant,
        allow_pickle=options.allow_pickle,
    )


def _resolve_registered(ref: str, options: ModelOptions) -> ResolvedModel:
    files = resolve_registered(ref)
    extra = {
        "registered_model": files.name,
        "registered_version": files.version,
        "mlflow_run_id": files.run_id,
        "train_mode": files.info.mode,
    }
    if files.lora is not None:
        # An adapter loads onto its base model, itself any reference (a registry one too).
        base_options = options.model_copy(update={"revision": files.info.base_revision})
        base = resolve_model(files.info.base_model, base_options)
        return replace(
            base, ref=ref, kind="mlflow", revision=files.version, lora_path=files.lora,
            extra={**base.extra, **extra, "base_model": files.info.base_model,
                   "base_model_path": str(base.path)},
        )
    if files.pipeline is None:
        raise ModelError(f"model {ref!r} (version {files.version}) has no pipeline artifact", field="model")
    refuse_pickle(files.pipeline, options.allow_pickle)
    return ResolvedModel(
        ref=ref, kind="mlflow", path=files.pipeline, revision=files.version,
        variant=options.variant, allow_pickle=options.allow_pickle, extra=extra,
    )


def resolve_model(ref: str, options: ModelOptions | None = None) -> ResolvedModel:
    options = options or ModelOptions()
    ref = check_model_ref(ref)
    if ref in TINY_NAMES:
        return ResolvedModel(ref=ref, kind="tiny", path=tiny_model_path(ref), revision=TINY_BUILD)
    if ref in TOY_NAMES:
        return ResolvedModel(ref=ref, kind="toy", path=toy_model_path(ref), revision=toy_build())
    if ref.startswith(MODELS_PREFIX):
        return _resolve_registered(ref, options)
    if Path(ref).expanduser().is_dir():
        return _resolve_local(ref, options)
    return _resolve_hub(ref, options)


def load_components(resolved: ResolvedModel, dtype=None) -> dict[str, Any]:
    """Load the pipeline components (unet, vae, text_encoder, tokenizer, scheduler) on the CPU."""
    from diffusers import StableDiffusionPipeline

    quiet_libraries()
    kwargs: dict[str, Any] = dict(safety_checker=None, requires_safety_checker=False)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if resolved.variant:
        kwargs["variant"] = resolved.variant
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            resolved.path, use_safetensors=None if resolved.allow_pickle else True, **kwargs
        )
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"could not load model {resolved.ref!r} from {resolved.path}: {exc}") from None
    comps = {k: v for k, v in pipe.components.items() if k in _COMPONENTS}
    missing = [k for k in _COMPONENTS if comps.get(k) is None]
    if missing:
        raise ModelError(f"model {resolved.ref!r} lacks components {missing}", field="model")
    return comps


_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
