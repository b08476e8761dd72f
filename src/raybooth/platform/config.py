"""Configuration: pydantic schemas loaded from YAML, with typed `--set dotted.key=value` overrides.

Every section forbids unknown keys, so a typo (`learnig_rate`) is an error that names the file, the
key path and the nearest valid key rather than a silently ignored setting. The schemas are plain
pydantic models so that Ray Tune can sample any field by its dotted path (`train.learning_rate`).
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from raybooth.platform.errors import ConfigError
from raybooth.platform.generation import GENERATION_DEFAULTS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelOptions(Section):
    """How a model reference is fetched (Hub revision/variant/cache, offline mode, pickle opt-in)."""

    revision: str | None = None
    variant: str | None = None
    cache_dir: str | None = None
    local_files_only: bool | None = Field(
        default=None, description="None: follow HF_HUB_OFFLINE; True: never touch the network"
    )
    allow_pickle: bool = Field(
        default=False, description="load .bin/.ckpt pickle weights (runs code from the file)"
    )


class SubjectConfig(Section):
    instance_data_dir: str = "examples/demo-subject"
    identifier: str = "sks"
    instance_prompt: str = "a photo of sks robot toy"
    class_prompt: str = "a photo of a robot toy"

    @field_validator("identifier")
    @classmethod
    def _one_token(cls, v: str) -> str:
        # DreamBooth binds the subject to one rare token; an empty or multi-word identifier
        # cannot be found in the prompt as a word.
        if not v.strip() or len(v.split()) != 1:
            raise ValueError(f"must be one word, a rare token such as 'sks' (got {v!r})")
        return v.strip()

    @model_validator(mode="after")
    def _identifier_in_prompt(self) -> "SubjectConfig":
        if self.identifier not in self.instance_prompt.split():
            raise ValueError(
                f"subject.instance_prompt {self.instance_prompt!r} does not contain the identifier "
                f"token {self.identifier!r}; DreamBooth binds the subject to that token, so write it "
                f"into the prompt (e.g. 'a photo of {self.identifier} dog') or change subject.identifier"
            )
        return self


class PriorsConfig(Section):
    enabled: bool = True
    num_class_images: int = Field(default=16, ge=1)
    class_data_dir: str = "runs/class-images"
    num_actors: int | Literal["auto"] = "auto"
    gpus_per_actor: float = Field(default=1.0, ge=0, description="used when a GPU is present")
    cpus_per_actor: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=4, ge=1)
    steps: int = Field(default=4, ge=1)
    guidance_scale: float = Field(default=GENERATION_DEFAULTS.guidance_scale, ge=0)
    scheduler: str = GENERATION_DEFAULTS.scheduler
    negative_prompt: str = ""
    seed: int = 0
    resolution: int | None = Field(default=None, description="None: train.resolution")

    @field_validator("num_actors")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' or at least 1")
        return v


class TrainSection(Section):
    mode: Literal["full", "lora"] = "full"
    lora_rank: int = Field(default=4, ge=1)
    lora_alpha: float | None = Field(default=None, description="None: equal to lora_rank")
    train_text_encoder: bool = True
    resolution: int = Field(default=64, ge=8)
    center_crop: bool = True
    random_flip: bool = False
    batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_steps: int = Field(default=20, ge=1)
    learning_rate: float = Field(default=5e-6, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    prior_loss_weight: float = Field(default=1.0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    adam_weight_decay: float = Field(default=1e-2, ge=0)
    snr_gamma: float | None = Field(default=None, gt=0)
    noise_offset: float = Field(default=0.0, ge=0)
    seed: int = 0
    cache_latents: bool = True
    checkpoint_every: int = Field(default=10, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    validation_every: int = Field(default=0, ge=0, description="0: only at the end")
    validation_prompts: list[str] = Field(default_factory=lambda: ["a photo of sks robot toy on a beach"])
    validation_steps: int = Field(default=4, ge=1)
    log_every: int = Field(
        default=10, ge=1, description="steps between metric flushes (losses stay on the device in between)"
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v}); try {max(8, v // 8 * 8)}")
        return v


class ScalingSection(Section):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="SPREAD puts workers on different nodes where it can"
    )


class RunSection(Section):
    name: str = "demo"
    storage_path: str = "runs"
    max_failures: int = Field(default=2, ge=-1)
    resume_from: str | None = Field(default=None, description="a checkpoint path or 'latest'")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return folder_name(v)


def folder_name(v: str) -> str:
    """A name that becomes one folder under a storage path (a run, a sweep)."""
    if not v or "/" in v or v in {".", ".."}:
        raise ValueError("must be a non-empty name without '/'")
    return v


class TrackingSection(Section):
    enabled: bool = True
    tracking_uri: str | None = Field(
        default=None, description="None: $MLFLOW_TRACKING_URI, else SQLite under $RAYBOOTH_HOME"
    )
    experiment: str = "raybooth"
    register_as: str | None = "demo-subject"
    alias: str = "candidate"


class EvaluationSection(Section):
    """Subject fidelity as in the DreamBooth paper (DINO, CLIP-I, CLIP-T): `raybooth evaluate`, and
    the end of training when a training config has this section (see raybooth.jobs.evaluate)."""

    prompt_set: str = Field(default="object", description="object | live (the paper's 25 prompts each)")
    prompts: list[str] | None = Field(
        default=None, description="your own prompts (with the identifier) instead of prompt_set"
    )
    class_noun: str | None = Field(
        default=None, description="None: the words after the identifier in subject.instance_prompt"
    )
    images_per_prompt: int = Field(default=4, ge=1)
    seed: int = Field(default=0, description="image k of every prompt uses seed + k")
    dino_encoder: str = "facebook/dino-vits16"
    dino_revision: str | None = None
    clip_encoder: str = "openai/clip-vit-base-patch32"
    clip_revision: str | None = None
    num_actors: int | Literal["auto"] = "auto"
    cpus_per_actor: float = Field(default=1.0, gt=0)
    gpus_per_actor: float = Field(default=1.0, ge=0, description="used when a GPU is present")
    batch_size: int = Field(default=4, ge=1)
    resolution: int | None = Field(default=None, description="None: the model's own size")
    steps: int = Field(default=25, ge=1)
    guidance_scale: float = Field(default=7.5, ge=0)
    scheduler: str = "ddim"
    bootstrap_samples: int = Field(default=1000, ge=100)
    every: int = Field(default=0, ge=0, description="training steps between evaluations; 0: only at the end")

    @field_validator("num_actors")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' or at least 1")
        return v


class TrainConfig(Section):
    """`raybooth train` / `raybooth priors` configuration (configs/train/*.yaml)."""

    model: str = "tiny"
    model_options: ModelOptions = Field(default_factory=ModelOptions)
    subject: SubjectConfig = Field(default_factory=SubjectConfig)
    priors: PriorsConfig = Field(default_factory=PriorsConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    evaluation: EvaluationSection | None = Field(default=None, description="None: no evaluation")


# ---------------------------------------------------------------------------------------------
# Loading and overrides

S = TypeVar("S", bound=BaseModel)


def _unwrap(annotation: Any) -> list[Any]:
    """The member types of an annotation (`int | None` -> [int, NoneType])."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for member in _unwrap(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _nearest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if match:
        return f"did you mean {match[0]!r}?"
    return "valid keys here: " + ", ".join(sorted(candidates))


def _field_at(schema: type[BaseModel], path: list[str], source: str) -> Any:
    """The pydantic FieldInfo at a dotted path, or a ConfigError naming the first wrong part."""
    model: type[BaseModel] | None = schema
    info = None
    for depth, part in enumerate(path):
        if model is None:
            # Inside a free-form field (a dict): any key is allowed.
            return None
        fields = model.model_fields
        if part not in fields:
            where = ".".join(path[: depth + 1])
            raise ConfigError(
                f"{source}: unknown key '{where}' — {_nearest(part, list(fields))}", field=where
            )
        info = fields[part]
        model = _submodel(info.annotation)
    return info


def _typed_value(info: Any, raw: str) -> Any:
    """Parse an override value as YAML unless the field is a plain string (keeps 'yes', '1e-5')."""
    all_members = _unwrap(info.annotation) if info else []
    if raw.lower() in {"null", "none", "~"} and (not info or type(None) in all_members):
        return None
    members = [m for m in all_members if m is not type(None)]
    if members and all(m is str for m in members):
        return raw
    return yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: list[str], schema: type[BaseModel]) -> dict:
    """Apply `dotted.key=value` overrides onto a raw config dict, checking keys against the schema."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set {item!r}: expected dotted.key=value, e.g. --set train.max_steps=100",
                field=item,
            )
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        info = _field_at(schema, path, f"--set {key}")
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = _typed_value(info, raw)
    return data


def _explain(exc: ValidationError, source: str, schema: type[BaseModel]) -> ConfigError:
    lines = []
    first_field = None
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        where = ".".join(loc) or "(top level)"
        first_field = first_field or where
        if err["type"] == "extra_forbidden":
            try:
                parent = _field_at(schema, loc[:-1], source) if loc[:-1] else None
                model = _submodel(parent.annotation) if parent is not None else schema
                hint = _nearest(loc[-1], list(model.model_fields)) if model else ""
            except ConfigError:
                hint = ""
            lines.append(f"unknown key '{where}' — {hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"'{where}': {msg}{shown}")
    return ConfigError(f"{source}: " + "; ".join(lines), field=first_field)


def validate_config(data: dict[str, Any], schema: type[S], source: str = "config") -> S:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source, schema) from None


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name the file (field `--config`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist", field="--config")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}", field="--config") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level", field="--config")
    return loaded


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, schema: type[S] = TrainConfig
) -> S:
    """Load a YAML file (or the defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = read_yaml_mapping(path)
    data = apply_overrides(data, list(overrides or []), schema)
    return validate_config(data, schema, source)


def flatten(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """`{"train.learning_rate": 5e-06, ...}`: for MLflow params and Tune search spaces."""
    out: dict[str, Any] = {}
    for key, value in config.model_dump().items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value


def with_overrides(config: S, values: dict[str, Any]) -> S:
    """A copy of `config` with dotted-path values set (what a Tune trial does), re-validated."""
    data = config.model_dump()
    for key, value in values.items():
        _field_at(type(config), key.split("."), f"override {key}")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # an optional section not set yet (e.g. evaluation)
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return validate_config(data, type(config), "overrides")


def add_config_arguments(parser: Any, what: str, example: str, required: bool = False) -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE` (typed by the schema when loaded with
    `load_config`): the same two options on every command that reads a config."""
    parser.add_argument("--config", required=required, default=None,
                        help=f"{what}{'' if required else '; defaults if absent'}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example}")
