"""HTTP request and response bodies (they are also what `/docs` shows).

Types and fixed rules live on the models; the limits an operator configures (`args.limits`) are
checked by `check_generation` against the parsed request. Every problem becomes a UserError that
names the field, which the ingress answers with a 4xx.
"""

from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raybooth.platform.errors import UserError
from raybooth.platform.schedulers import SCHEDULERS, check_scheduler
from raybooth.serve_apps.settings import Defaults, Limits

MAX_SEED = 2**63 - 1 - 1024  # seed + k must stay a valid generator seed for every image k


class GenerationRequest(BaseModel):
    """POST /v1/images/generations (JSON)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="what to draw")
    negative_prompt: str | None = Field(default=None, description="what to steer away from")
    model: str | None = Field(default=None, description="a model or subject from GET /v1/models; default: the first model")
    n: int = Field(default=1, description="number of images; image k uses seed + k")
    steps: int | None = Field(default=None, description="denoising steps")
    guidance_scale: float | None = Field(default=None, description="classifier-free guidance scale")
    scheduler: str | None = Field(default=None, description=f"one of {', '.join(SCHEDULERS)}")
    seed: int | None = Field(default=None, description="made up (and returned) when absent")
    width: int | None = Field(default=None, description="multiple of 8; default: the model's size")
    height: int | None = Field(default=None, description="multiple of 8; default: the model's size")
    response_format: Literal["b64_json", "png"] = Field(
        default="b64_json", description="b64_json: JSON with base64 PNGs; png: the PNG itself (n = 1)"
    )


class EditRequest(GenerationRequest):
    """POST /v1/images/edits: inpainting. As JSON, `image` and `mask` are base64 (or data: URLs);
    as multipart/form-data they are files and the other fields are form fields."""

    image: str = Field(description="the picture to edit (PNG, JPEG, WebP...)")
    mask: str = Field(description="white = repaint, black = keep; the image's size")
    strength: float = Field(default=1.0, description="0 < strength <= 1: how far from the original to start")
    mask_blur: float = Field(default=0.0, description="Gaussian blur radius (px) of the mask edge")
    crop_margin: int | None = Field(
        default=None, description="repaint only the box around the mask plus this margin (px), at full resolution"
    )


class ImageData(BaseModel):
    b64_json: str
    seed: int


class Timings(BaseModel):
    queue_s: float = Field(description="at the replica, from arrival to the start of its pipeline call")
    inference_s: float = Field(description="the pipeline call this request ran in")
    total_s: float = Field(description="at the ingress, from parsed request to response")


class ImagesResponse(BaseModel):
    created: int
    model: str
    data: list[ImageData]
    parameters: dict
    timings: Timings
    batch_size: int = Field(description="images in the batch this request ran in (all requests together)")
    request_id: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    task: str
    kind: str
    base_model: str
    deployment: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def parse_request(model: type[BaseModel], data: object) -> BaseModel:
    """Validate a decoded body; the first problem becomes a UserError naming its field."""
    if not isinstance(data, dict):
        raise UserError("the request body must be a JSON object", field=None)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields)
            raise UserError(f"unknown field {field!r}; the fields are: {known}", field=field) from None
        if err["type"] == "missing":
            raise UserError(f"{field} is required", field=field) from None
        got = err.get("input")
        shown = f" (got {got!r})" if isinstance(got, (int, float, str)) and len(repr(got)) <= 60 else ""
        raise UserError(f"{field}: {err['msg']}{shown}", field=field) from None


def _between(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise UserError(f"{name} must be between {low:g} and {high:g} (got {value:g})", field=name)


def check_generation(req: GenerationRequest, limits: Limits, defaults: Defaults) -> dict:
    """Apply defaults and the configured limits; return the parameters a job runs with."""
    if not req.prompt.strip():
        raise UserError("prompt must not be empty", field="prompt")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise UserError(
                f"{name} is {len(text)} characters; the limit is {limits.max_prompt_chars}", field=name
            )
    _between("n", req.n, 1, limits.max_images)
    steps = req.steps if req.steps is not None else defaults.steps
    _between("steps", steps, 1, limits.max_steps)
    guidance = req.guidance_scale if req.guidance_scale is not None else defaults.guidance_scale
    _between("guidance_scale", guidance, 0, limits.max_guidance_scale)
    scheduler = req.scheduler if req.scheduler is not None else defaults.scheduler
    check_scheduler(scheduler)
    for name in ("width", "height"):
        value = getattr(req, name)
        if value is None:
            continue
        if value < 8 or value % 8:
            raise UserError(f"{name} must be a positive multiple of 8 (got {value})", field=name)
        if value > limits.max_side:
            raise UserError(f"{name} is {value}; the limit is {limits.max_side}", field=name)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    _between("seed", seed, 0, MAX_SEED)
    if req.response_format == "png" and req.n != 1:
        raise UserError("response_format png returns one image: use n = 1, or b64_json", field="response_format")
    params = dict(steps=steps, guidance_scale=float(guidance), scheduler=scheduler, width=req.width,
                  height=req.height, seed=seed, n=req.n)
    if isinstance(req, EditRequest):
        if not 0.0 < req.strength <= 1.0:
            raise UserError(f"strength must be in (0, 1] (got {req.strength:g})", field="strength")
        _between("mask_blur", req.mask_blur, 0, 256)
        if req.crop_margin is not None:
            _between("crop_margin", req.crop_margin, 0, limits.max_side)
        params.update(strength=req.strength, mask_blur=req.mask_blur, crop_margin=req.crop_margin)
    return params
