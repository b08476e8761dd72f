"""The Serve application's arguments: the `args:` block of a Serve config file
(configs/serve/*.yaml), validated like every other raybooth config (unknown keys are errors).

The *how many replicas, which resources, how big a queue* part lives in the same file's
`deployments:` list, in Serve's own format, so `serve deploy` and a KubeRay RayService read it
unchanged. What lives here is what the code needs: which models to load, which LoRA subjects a
replica may load, request limits and auth.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raybooth.platform.config import ModelOptions, Section, validate_config
from raybooth.platform.generation import GENERATION_DEFAULTS

TEXT_TO_IMAGE = "text-to-image"
INPAINTING = "inpainting"
Task = Literal["text-to-image", "inpainting"]

# Public model and subject names: what a client writes in the `model` field. A fixed alphabet,
# so a name can never be a path, a URL or anything a loader would interpret.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEPLOYMENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def _check_name(value: str, what: str) -> str:
    if not NAME.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


class ModelSpec(Section):
    """One model deployment: a base pipeline, plus the LoRA subjects it may load onto it."""

    name: str | None = Field(default=None, description="public name in the HTTP `model` field; default: `model`")
    model: str = "tiny"
    model_options: ModelOptions = Field(default_factory=ModelOptions)
    deployment: str | None = Field(
        default=None,
        description="Serve deployment name (the key in the config's `deployments:` list); "
        "default TextToImage / Inpainting for the first model of a task, else <that>-<name>",
    )
    subjects: dict[str, str] = Field(
        default_factory=dict,
        description="subject name -> LoRA adapter folder or models:/NAME@ALIAS of a LoRA model",
    )
    max_loaded_subjects: int = Field(
        default=8, ge=1, description="LoRA adapters kept on one replica (least recently used evicted)"
    )
    device: str = "auto"
    dtype: str = "auto"
    channels_last: bool = False
    compile_unet: bool = False
    torch_threads: int | None = Field(
        default=None, ge=1,
        description="None: the CPUs the replica reserved (ray_actor_options.num_cpus), at least 1",
    )
    warmup_steps: int = Field(default=2, ge=0, description="0: no warm-up generation at start")
    revision_note: str = Field(
        default="",
        description="free text; change it and `serve deploy` to roll replicas (e.g. after moving an alias)",
    )

    @field_validator("subjects")
    @classmethod
    def _subject_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, ref in v.items():
            _check_name(name, "subject name")
            if not isinstance(ref, str) or not ref.strip():
                raise ValueError(f"subject {name!r}: give a LoRA folder or a models:/ reference")
        return v

    @field_validator("deployment")
    @classmethod
    def _deployment_name(cls, v: str | None) -> str | None:
        if v is not None and not DEPLOYMENT_NAME.match(v):
            raise ValueError(f"deployment name {v!r}: letters, digits, '_' and '-', starting with a letter")
        return v

    @model_validator(mode="after")
    def _default_name(self) -> "ModelSpec":
        if self.name is None:
            # validate_assignment is on: set through __dict__ to avoid re-running validators.
            self.__dict__["name"] = self.model
        if not NAME.match(self.name or ""):
            raise ValueError(
                f"model name {self.name!r}: give `name:` (1-64 letters, digits, '.', '_', '-') "
                f"for model {self.model!r}"
            )
        return self


class Limits(Section):
    """What one HTTP request may ask for. Everything beyond is a 4xx naming the field."""

    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_prompt_chars: int = Field(default=1000, ge=1)
    max_images: int = Field(default=4, ge=1, description="the most `n` one request may ask for")
    max_steps: int = Field(default=100, ge=1)
    max_guidance_scale: float = Field(default=30.0, ge=0)
    max_side: int = Field(default=1024, ge=8, description="the most width or height, in pixels")
    max_input_pixels: int = Field(default=2048 * 2048, ge=64, description="uploaded image/mask pixels")
    request_timeout_s: float = Field(default=300.0, gt=0)
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After on a 503 when queues are full")


class AuthSettings(Section):
    """Optional API keys. With no key configured the API is open (say so in the logs)."""

    api_keys_env: str = "RAYBOOTH_API_KEYS"  # comma- or whitespace-separated keys
    api_keys_file: str | None = None  # one key per line, '#' comments; re-read when it changes
    required: bool = Field(default=False, description="refuse to start when no key is configured")


class Defaults(Section):
    """Request defaults for fields a client leaves out."""

    steps: int = Field(default=GENERATION_DEFAULTS.steps, ge=1)
    guidance_scale: float = Field(default=GENERATION_DEFAULTS.guidance_scale, ge=0)
    scheduler: str = GENERATION_DEFAULTS.scheduler


class AppArgs(Section):
    """`args:` of the raybooth Serve application."""

    text_to_image: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(model="tiny")])
    inpainting: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(model="tiny-inpainting")])
    limits: Limits = Field(default_factory=Limits)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    defaults: Defaults = Field(default_factory=Defaults)
    mlflow_ui_url: str | None = Field(
        default=None, pattern=r"^https?://", description="the MLflow UI the playground page links to"
    )

    @model_validator(mode="after")
    def _unique(self) -> "AppArgs":
        for task, specs in ((TEXT_TO_IMAGE, self.text_to_image), (INPAINTING, self.inpainting)):
            seen: dict[str, str] = {}
            for spec in specs:
                for public in [spec.name, *spec.subjects]:
                    if public in seen:
                        raise ValueError(
                            f"{task}: the name {public!r} is used twice ({seen[public]} and "
                            f"{spec.name}); model and subject names must be unique per task"
                        )
                    seen[public] = spec.name or ""
        names = [deployment_name(t, i, s) for t, specs in self.by_task().items() for i, s in enumerate(specs)]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"deployment names used twice: {sorted(dupes)}; set `deployment:` per model")
        return self

    def by_task(self) -> dict[str, list[ModelSpec]]:
        return {TEXT_TO_IMAGE: self.text_to_image, INPAINTING: self.inpainting}


BASE_DEPLOYMENT = {TEXT_TO_IMAGE: "TextToImage", INPAINTING: "Inpainting"}


def deployment_name(task: str, index: int, spec: ModelSpec) -> str:
    if spec.deployment:
        return spec.deployment
    base = BASE_DEPLOYMENT[task]
    if index == 0:
        return base
    return f"{base}-{re.sub(r'[^A-Za-z0-9_-]', '_', spec.name or '')}"


def load_args(data: dict[str, Any] | AppArgs | None, source: str = "serve config args") -> AppArgs:
    if isinstance(data, AppArgs):
        return data
    data = dict(data or {})
    # Each model entry on its own first: a typo inside a list item then gets the same
    # "did you mean" hint as anywhere else, with the item's index.
    for task in ("text_to_image", "inpainting"):
        entries = data.get(task)
        if isinstance(entries, list):
            for i, entry in enumerate(entries):
                if isinstance(entry, dict):
                    validate_config(entry, ModelSpec, f"{source}: {task}[{i}]")
    return validate_config(data, AppArgs, source)
