"""The HTTP ingress: a FastAPI app in a Serve deployment that checks, routes and answers.

Every request: a request id (Serve's `x-request-id`, echoed in the `X-Request-ID` response
header), the API key check (all routes but /healthz and the docs), a body read within the size
limit, validation against the configured limits, then one call to the model deployment that
serves the requested model, bounded by the request timeout. One JSON log line per request.

The image routes speak the OpenAI Images API as well as raybooth's own fields (schemas.py), and
their request schemas carry this app's limits (`request_models`), so /openapi.json states what
the server enforces. Errors are JSON `{"error": {"message", "type", "param", "code", "field"}}`
(what OpenAI clients read, plus raybooth's `field`): 4xx naming the field for bad input,
503 + Retry-After when a model's queue is full, 504 when generation outlasts the timeout.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raybooth.platform.errors import UserError
from raybooth.serve_apps.auth import ApiKeys
from raybooth.serve_apps.catalog import Catalog, Route
from raybooth.serve_apps.http_errors import STATUS_CODES, ApiError, error_response, from_user_error
from raybooth.serve_apps.playground import PLAYGROUND_PATHS, add_playground_routes
from raybooth.serve_apps.batching import ImageJob, JobResult
from raybooth.serve_apps.schemas import (
    EditRequest,
    ErrorResponse,
    GenerationRequest,
    ImagesResponse,
    ModelList,
    check_generation,
    parse_request,
    request_models,
)
from raybooth.serve_apps.settings import INPAINTING, TEXT_TO_IMAGE, load_args
from raybooth.serve_apps.uploads import (
    decode_base64_image,
    decode_pair,
    edit_files,
    media_type,
    parse_json,
    parse_multipart,
    read_body,
)

logger = logging.getLogger("ray.serve")

OPEN_PATHS = {"/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc", *PLAYGROUND_PATHS}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 503, 504)
}
# The image routes' 200: JSON (response_model), or the PNG itself with response_format png.
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
}


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=200,
    ray_actor_options={"num_cpus": 0.1},
    health_check_period_s=10,
)
@serve.ingress()
class Ingress:
    def __init__(self, args: dict[str, Any], models: dict[str, Any]):
        from raybooth.serve_apps.metrics import IngressMetrics

        self.args = load_args(args)
        self.catalog = Catalog(self.args)
        self.models = models  # deployment name -> DeploymentHandle
        self.keys = ApiKeys(self.args.auth)
        self.metrics = IngressMetrics()
        logger.info(
            "raybooth ingress: %d models/subjects, API keys %s",
            len(self.catalog.cards()),
            "required" if self.keys.enabled else f"OFF (set {self.args.auth.api_keys_env} to require them)",
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    async def call_model(self, route: Route, job: ImageJob) -> JobResult:
        handle = self.models[route.deployment]
        if route.subject:
            # Routes to replicas that already hold this subject; Serve batches per subject.
            handle = handle.options(multiplexed_model_id=route.subject)
        timeout = self.args.limits.request_timeout_s
        response = handle.generate.remote(job)
        try:
            result: JobResult = await asyncio.wait_for(_await(response), timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, "timeout",
                           f"the images were not ready within {timeout:g} s; ask for fewer images or "
                           "steps, or retry when the server is less busy") from None
        except Exception as exc:
            raise _unavailable(exc, self.args.limits.retry_after_s) from exc
        if result.error:
            err = result.error
            raise ApiError(err["status"], err["code"], err["message"], err.get("field"))
        return result


async def _await(response: Any) -> Any:
    return await response


def _unavailable(exc: Exception, retry_after: int) -> ApiError:
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return ApiError(503, "overloaded", "the model's queue is full; retry after a moment",
                        headers={"Retry-After": str(retry_after)})
    from ray.exceptions import RayTaskError

    logger.exception("model call failed")
    if isinstance(exc, RayTaskError):  # a bug in the replica, not a busy one
        return ApiError(500, "generation_failed", f"generation failed on the replica ({type(exc).__name__})")
    return ApiError(503, "model_unavailable",
                    f"the model replica could not answer ({type(exc).__name__}); retry after a moment",
                    headers={"Retry-After": str(retry_after)})


def build_api(server: Ingress) -> FastAPI:
    from raybooth import __version__

    limits = server.args.limits
    names: dict[str, list[str]] = {}
    for card in server.catalog.cards():
        names.setdefault(card["task"], []).append(card["id"])
    # The request bodies with this app's limits: what is validated is what /openapi.json states.
    GenerationBody, EditBody = request_models(limits, names)
    app = FastAPI(
        title="raybooth",
        version=__version__,
        description="Text-to-image and inpainting with Stable Diffusion and DreamBooth subjects. "
        "Send `Authorization: Bearer <key>` when the server has API keys.",
    )

    @app.middleware("http")
    async def around_request(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id
        request.state.log = {}
        started = time.perf_counter()
        if request.url.path not in OPEN_PATHS and not server.keys.check(request.headers.get("authorization")):
            response: Response = error_response(
                401, "unauthorized", "a valid API key is required: send `Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            try:
                response = await call_next(request)
            except Exception:  # never a traceback to the client
                logger.exception("request %s failed", request_id)
                response = error_response(500, "internal_error",
                                          f"internal error; quote request id {request_id} when reporting it")
        seconds = time.perf_counter() - started
        route = request.scope.get("route")
        route_path = getattr(route, "path", "unmatched")
        server.metrics.record(route_path, response.status_code, seconds)
        logger.info(json.dumps({
            "event": "http_request", "request_id": request_id, "method": request.method,
            "path": request.url.path, "status": response.status_code,
            "latency_ms": round(seconds * 1000, 1), **request.state.log,
        }, default=str))
        return response

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        request.state.log["error"] = exc.code
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        code = STATUS_CODES.get(exc.status_code, "http_error")
        # Keep Starlette's headers (a 405's Allow).
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in err["loc"][1:]) or None
        return error_response(400, "invalid_request", err["msg"], field)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict:
        """Liveness of the ingress (no API key needed)."""
        return {"status": "ok", "version": __version__}

    @app.get("/v1/models", tags=["models"], response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> dict:
        """Models and LoRA subjects this server serves, per task."""
        return {"object": "list", "data": server.catalog.cards()}

    @app.post(
        "/v1/images/generations", tags=["images"], response_model=ImagesResponse, responses=IMAGE_RESPONSES,
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": GenerationBody.model_json_schema()}}}},
    )
    async def generations(request: Request):
        """Text-to-image. Image k of a request uses seed + k: the same request and seed give the
        same images whether the request ran alone or batched with others."""
        started = time.perf_counter()
        body = await read_body(request, limits.max_body_bytes)
        if media_type(request) not in ("application/json", ""):
            raise ApiError(415, "unsupported_media_type", "send the request as application/json")
        try:
            req = parse_request(GenerationBody, parse_json(body))
            assert isinstance(req, GenerationRequest)
            params = check_generation(req, limits, server.args.defaults)
            route = server.catalog.resolve(TEXT_TO_IMAGE, req.model)
        except UserError as exc:
            raise from_user_error(exc) from None
        job = _job(TEXT_TO_IMAGE, req, params, route, request.state.request_id)
        return await _answer(server, request, route, job, req, params, started)

    @app.post(
        "/v1/images/edits", tags=["images"], response_model=ImagesResponse, responses=IMAGE_RESPONSES,
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": EditBody.model_json_schema()},
            "multipart/form-data": {"schema": _multipart_schema(EditBody)},
        }}},
    )
    async def edits(request: Request):
        """Inpainting; pixels outside the mask come back unchanged. The mask: without
        transparency, white is repainted and black kept; with transparent pixels (OpenAI's
        convention), transparent is repainted and opaque kept; no mask: the image's own transparent
        pixels. JSON with base64 `image` and `mask`, or multipart/form-data with `image` (or
        `image[]`) and `mask` files and the other fields as form fields."""
        started = time.perf_counter()
        body = await read_body(request, limits.max_body_bytes)
        kind = media_type(request)
        try:
            if kind == "multipart/form-data":
                fields, files = await parse_multipart(request, body, 4 * limits.max_prompt_chars + 1024)
                for name in ("image", "image[]", "mask"):
                    if name in fields:  # a text part where a file belongs: decode what was sent
                        files[name] = fields.pop(name).encode()
                image_bytes, mask_bytes = edit_files(files)
                req = parse_request(EditBody, {**fields, "image": ""}, form=True)  # the bytes came as a file
            elif kind in ("application/json", ""):
                req = parse_request(EditBody, parse_json(body))
                assert isinstance(req, EditRequest)
                image_bytes = decode_base64_image(req.image, "image")
                mask_bytes = None if req.mask is None else decode_base64_image(req.mask, "mask")
            else:
                raise ApiError(415, "unsupported_media_type",
                               "send multipart/form-data (image and mask files) or application/json (base64)")
            assert isinstance(req, EditRequest)
            params = check_generation(req, limits, server.args.defaults)
            route = server.catalog.resolve(INPAINTING, req.model)
            # Off the event loop: a large upload takes a while to decode.
            image, mask = await asyncio.to_thread(decode_pair, image_bytes, mask_bytes, limits.max_input_pixels)
        except UserError as exc:
            raise from_user_error(exc) from None
        job = _job(INPAINTING, req, params, route, request.state.request_id, image=image, mask=mask)
        return await _answer(server, request, route, job, req, params, started)

    add_playground_routes(app, server.args)  # the page at / and /playground
    return app


def _multipart_schema(body: type[EditRequest]) -> dict:
    schema = body.model_json_schema()
    props = dict(schema.get("properties", {}))
    for name in ("image", "mask"):
        props[name] = {"type": "string", "format": "binary", "description": props[name].get("description", "")}
    # The rules across fields (size or width/height; png means n = 1) are stated on the JSON
    # body only: schema-driven tools do not yet generate forms from them next to binary parts.
    return {"type": "object", "properties": props, "required": ["prompt", "image"],
            "additionalProperties": False}


def _job(task: str, req: GenerationRequest, params: dict, route: Route, request_id: str, **extra) -> ImageJob:
    job = ImageJob(
        task=task, prompt=req.prompt, negative_prompt=req.negative_prompt,
        seeds=[params["seed"] + k for k in range(params["n"])], steps=params["steps"],
        guidance_scale=params["guidance_scale"], scheduler=params["scheduler"],
        width=params["width"], height=params["height"], subject=route.subject, request_id=request_id,
        **extra,
    )
    if task == INPAINTING:
        job.strength, job.mask_blur, job.crop_margin = params["strength"], params["mask_blur"], params["crop_margin"]
    return job


async def _answer(server: Ingress, request: Request, route: Route, job: ImageJob, req: GenerationRequest,
                  params: dict, started: float):
    request.state.log.update(model=route.name, n=job.n, task=job.task)
    result = await server.call_model(route, job)
    total = time.perf_counter() - started
    request.state.log.update(batch_size=result.batch_size, queue_s=round(result.queue_s, 4),
                             inference_s=round(result.inference_s, 4), replica=result.replica)
    used = {**params, "width": result.width, "height": result.height,
            "negative_prompt": req.negative_prompt, "revision": result.model.get("model_revision")}
    if req.response_format == "png":
        return Response(result.images[0], media_type="image/png", headers={
            "X-Seed": str(result.seeds[0]), "X-Batch-Size": str(result.batch_size), "X-Model": route.name,
            "X-Queue-Seconds": f"{result.queue_s:.4f}", "X-Inference-Seconds": f"{result.inference_s:.4f}",
        })
    return JSONResponse({
        "created": int(time.time()),
        "model": route.name,
        "size": f"{result.width}x{result.height}",
        "output_format": "png",
        "data": [{"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed}
                 for png, seed in zip(result.images, result.seeds)],
        "parameters": used,
        "timings": {"queue_s": round(result.queue_s, 4), "inference_s": round(result.inference_s, 4),
                    "total_s": round(total, 4)},
        "batch_size": result.batch_size,
        "group_size": result.group_size,
        "replica": result.replica,
        "request_id": request.state.request_id,
    })
