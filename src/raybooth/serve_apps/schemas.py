"""HTTP request and response bodies (they are also what `/docs` and `/openapi.json` show).

The request models are built per app by `request_models(limits, models)`: every limit an
operator configures (`args.limits`: n, steps, guidance, sides, prompt length) and every fixed
rule (sides multiple of 8, scheduler names, seed range, strength range) is a constraint on the
model itself, so the OpenAPI document states exactly what the server enforces, from the same
`Limits` object. `check_generation` then fills in defaults and checks what JSON Schema cannot say
well (a prompt of blanks). Every problem becomes a UserError that names the field, which the
ingress answers with a 4xx.

The fields are raybooth's and the OpenAI Images API's together: `size` ("WxH", like width and
height), `n`, `model`, `response_format` (`b64_json`; `url` is refused with a clear 400, since
this server does not keep images to link to), `user` (accepted, ignored).
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from raybooth.platform.errors import UserError
from raybooth.platform.generation import SIDE_MULTIPLE
from raybooth.platform.schedulers import SCHEDULERS, check_scheduler
from raybooth.serve_apps.settings import Defaults, Limits

MAX_SEED = 2**53 - 1  # exact in every JSON client (doubles); seed + k stays a valid generator seed
MAX_MASK_BLUR = 256
MAX_USER_CHARS = 256
SchedulerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]

# What JSON Schema says about fields together (the same rules check_generation applies).
CROSS_FIELD_RULES: dict[str, Any] = {
    "not": {"anyOf": [{"required": ["size", "width"]}, {"required": ["size", "height"]}]},
    "if": {"properties": {"response_format": {"const": "png"}}, "required": ["response_format"]},
    "then": {"properties": {"n": {"const": 1}}},
}


class GenerationRequest(BaseModel):
    """POST /v1/images/generations (JSON)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=CROSS_FIELD_RULES)

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
    size: str | None = Field(
        default=None, description="OpenAI style \"WxH\" (e.g. \"512x512\"): width and height in one field; "
        "give either size or width/height")
    response_format: Literal["b64_json", "png"] = Field(
        default="b64_json", description="b64_json: JSON with base64 PNGs; png: the PNG itself (n = 1). "
        "(OpenAI's `url` is not offered: this server keeps no images to link to)"
    )
    user: str | None = Field(default=None, description="OpenAI clients' end-user id: accepted, not used")


class EditRequest(GenerationRequest):
    """POST /v1/images/edits: inpainting. As JSON, `image` and `mask` are base64 (or data: URLs);
    as multipart/form-data they are files (`image` or `image[]`) and the other fields are form fields."""

    image: str = Field(description="the picture to edit (PNG, JPEG, WebP, BMP, GIF, TIFF)")
    mask: str | None = Field(
        default=None, description="the area to repaint, the image's size. Without transparency: white = "
        "repaint, black = keep. With transparent pixels (OpenAI's convention): transparent = repaint, "
        "opaque = keep. Absent: the image's own transparent pixels are the area")
    strength: float = Field(default=1.0, description="0 < strength <= 1: how far from the original to start")
    mask_blur: float = Field(default=0.0, description="Gaussian blur radius (px) of the mask edge")
    crop_margin: int | None = Field(
        default=None, description="repaint only the box around the mask plus this margin (px), at full resolution"
    )


# ---------------------------------------------------------------------------------------------
# The limits as constraints


def side_values(limits: Limits) -> list[int]:
    return list(range(SIDE_MULTIPLE, limits.max_side + 1, SIDE_MULTIPLE))


def size_pattern(limits: Limits) -> str:
    """An exact regular expression for "WxH" with both sides multiples of 8 up to max_side."""
    sides = "|".join(str(v) for v in reversed(side_values(limits)))
    return f"^({sides})x({sides})$"


def _limited_fields(limits: Limits, models: list[str] | None) -> dict[str, Any]:
    side = dict(ge=SIDE_MULTIPLE, le=limits.max_side, multiple_of=SIDE_MULTIPLE)
    text = dict(max_length=limits.max_prompt_chars)
    model_extra = {"enum": [*models, None]} if models else None
    return {
        "prompt": (str, Field(min_length=1, pattern=r"\S", description="what to draw", **text)),
        "negative_prompt": (str | None, Field(default=None, description="what to steer away from", **text)),
        "model": (str | None, Field(default=None, json_schema_extra=model_extra,
                                    description="a model or subject from GET /v1/models; default: the first model")),
        "n": (int, Field(default=1, ge=1, le=limits.max_images, description="number of images; image k uses seed + k")),
        "steps": (int | None, Field(default=None, ge=1, le=limits.max_steps, description="denoising steps")),
        "guidance_scale": (float | None, Field(default=None, ge=0, le=limits.max_guidance_scale,
                                               allow_inf_nan=False, description="classifier-free guidance scale")),
        "scheduler": (SchedulerName | None, Field(default=None, description="noise scheduler")),
        "seed": (int | None, Field(default=None, ge=0, le=MAX_SEED, description="made up (and returned) when absent")),
        "width": (int | None, Field(default=None, description="default: the model's size", **side)),
        "height": (int | None, Field(default=None, description="default: the model's size", **side)),
        "size": (str | None, Field(default=None, pattern=size_pattern(limits),
                                   description="OpenAI style \"WxH\": width and height in one field (each a "
                                   f"multiple of {SIDE_MULTIPLE} up to {limits.max_side}); give size or width/height")),
        "user": (str | None, Field(default=None, max_length=MAX_USER_CHARS,
                                   description="OpenAI clients' end-user id: accepted, not used")),
    }


def _edit_fields(limits: Limits) -> dict[str, Any]:
    return {
        "strength": (float, Field(default=1.0, gt=0, le=1, allow_inf_nan=False,
                                  description="how far from the original to start (0 < strength <= 1)")),
        "mask_blur": (float, Field(default=0.0, ge=0, le=MAX_MASK_BLUR, allow_inf_nan=False,
                                   description="Gaussian blur radius (px) of the mask edge")),
        "crop_margin": (int | None, Field(default=None, ge=0, le=limits.max_side,
                                          description="repaint only the box around the mask plus this margin "
                                          "(px), at full resolution")),
    }


def request_models(limits: Limits, models: dict[str, list[str]] | None = None
                   ) -> tuple[type[GenerationRequest], type[EditRequest]]:
    """Request models whose constraints (and so whose OpenAPI schema) are this app's limits.
    `models`: task -> the public model/subject names (stated as the `model` enum; a name outside
    it is still answered 404, naming the models this server has)."""
    models = models or {}
    generation = create_model("GenerationRequest", __base__=GenerationRequest,
                              **_limited_fields(limits, models.get("text-to-image")))
    edit = create_model("EditRequest", __base__=EditRequest,
                        **_limited_fields(limits, models.get("inpainting")), **_edit_fields(limits))
    return generation, edit


# ---------------------------------------------------------------------------------------------
# Responses


class ImageData(BaseModel):
    b64_json: str
    seed: int


class Timings(BaseModel):
    queue_s: float = Field(description="at the replica, from arrival to the start of its pipeline call")
    inference_s: float = Field(description="the pipeline call this request ran in")
    total_s: float = Field(description="at the ingress, from parsed request to response")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time (s), as in the OpenAI Images API")
    model: str
    data: list[ImageData]
    size: str = Field(description="\"WxH\" of the images")
    output_format: Literal["png"] = "png"
    parameters: dict
    timings: Timings
    batch_size: int = Field(description="images in the batch this request ran in (all requests together)")
    group_size: int = Field(description="images in the pipeline call this request ran in")
    replica: str
    request_id: str


class ErrorDetail(BaseModel):
    """Read by OpenAI clients as error.message / .type / .param / .code; `field` is raybooth's
    name for `param` (kept for existing clients)."""

    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, server_error")
    param: str | None = Field(default=None, description="the request field at fault")
    code: str
    field: str | None = Field(default=None, description="the same as param")


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


# ---------------------------------------------------------------------------------------------
# Checking a request


def parse_request(model: type[BaseModel], data: object, *, form: bool = False) -> BaseModel:
    """Validate a decoded body; the first problem becomes a UserError naming its field.

    JSON numbers are taken as JSON Schema reads them (`"steps": 2.0` is the integer 2), but a
    boolean or a string is not a number (`"seed": false`, `"n": "2"` are errors, as the schema
    says); multipart form fields are text by nature, so `form=True` converts "2" to 2."""
    if not isinstance(data, dict):
        raise UserError("the request body must be a JSON object", field=None)
    if not form:
        for name in _numeric_fields(model) & set(data):
            value = data[name]
            if isinstance(value, (bool, str)):
                raise UserError(f"{name}: a number is needed (got {value!r})", field=name)
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
        if field == "response_format" and got == "url":
            raise UserError(
                "response_format 'url' is not offered: this server keeps no images to link to; use "
                "b64_json (the default) or png", field=field) from None
        if field == "size" and err["type"] == "string_pattern_mismatch":
            raise UserError(
                f"size must be \"WxH\" with width and height multiples of {SIDE_MULTIPLE} up to the "
                f"server's limit (got {got!r})", field=field) from None
        if field == "prompt" and err["type"] in ("string_pattern_mismatch", "string_too_short"):
            raise UserError("prompt must not be empty", field=field) from None
        shown = f" (got {got!r})" if isinstance(got, (int, float, str)) and len(repr(got)) <= 60 else ""
        raise UserError(f"{field}: {err['msg']}{shown}", field=field) from None


def _numeric_fields(model: type[BaseModel]) -> set[str]:
    import typing

    numeric = set()
    for name, info in model.model_fields.items():
        kinds = typing.get_args(info.annotation) or (info.annotation,)
        if any(k in (int, float) for k in kinds):
            numeric.add(name)
    return numeric


def _between(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise UserError(f"{name} must be between {low:g} and {high:g} (got {value:g})", field=name)


def parse_size(size: str, limits: Limits) -> tuple[int, int]:
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise UserError(f"size must be \"WxH\", e.g. \"512x512\" (got {size!r})", field="size")
    return int(width), int(height)


def check_generation(req: GenerationRequest, limits: Limits, defaults: Defaults) -> dict:
    """Apply defaults and the configured limits; return the parameters a job runs with.

    The request models of `request_models` already hold these limits; checking again here keeps
    the plain models (and any caller that builds one directly) as safe."""
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
    width, height = req.width, req.height
    if req.size is not None:
        if width is not None or height is not None:
            raise UserError("give size or width/height, not both", field="size")
        width, height = parse_size(req.size, limits)
    for name, value in (("width", width), ("height", height)):
        field = "size" if req.size is not None else name
        if value is None:
            continue
        if value < SIDE_MULTIPLE or value % SIDE_MULTIPLE:
            raise UserError(f"{name} must be a positive multiple of {SIDE_MULTIPLE} (got {value})", field=field)
        if value > limits.max_side:
            raise UserError(f"{name} is {value}; the limit is {limits.max_side}", field=field)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    _between("seed", seed, 0, MAX_SEED)
    if req.response_format == "png" and req.n != 1:
        raise UserError("response_format png returns one image: use n = 1, or b64_json", field="response_format")
    params = dict(steps=steps, guidance_scale=float(guidance), scheduler=scheduler, width=width,
                  height=height, seed=seed, n=req.n)
    if isinstance(req, EditRequest):
        if not 0.0 < req.strength <= 1.0:
            raise UserError(f"strength must be in (0, 1] (got {req.strength:g})", field="strength")
        _between("mask_blur", req.mask_blur, 0, MAX_MASK_BLUR)
        if req.crop_margin is not None:
            _between("crop_margin", req.crop_margin, 0, limits.max_side)
        params.update(strength=req.strength, mask_blur=req.mask_blur, crop_margin=req.crop_margin)
    return params
