"""The playground page: static HTML/CSS/JS shipped inside the package (assets/playground/), served
by the ingress at `/` and `/playground`, plus a small JSON document that tells the page what this
server allows (limits, defaults, schedulers) and where the MLflow UI is.

No CDN, no build step: the files are read once when the ingress builds its app. The page calls the
same public API as any client (`/v1/models`, `/v1/images/generations`, `/v1/images/edits`), so
the page and its assets need no API key; the API calls it makes do.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from raybooth.platform.schedulers import SCHEDULERS
from raybooth.serve_apps.settings import AppArgs

ASSETS = {  # URL path -> (file in assets/playground, media type)
    "/playground/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/playground/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_PATHS = ("/", "/playground")
CONFIG_PATH = "/playground/config.json"
# Open to everyone: the page asks for an API key itself when the API answers 401.
PLAYGROUND_PATHS = frozenset({*PAGE_PATHS, *ASSETS, CONFIG_PATH})

# The page runs only its own script and style, and shows only images it made itself (blob: URLs).
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; connect-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}


def _read(name: str) -> bytes:
    return resources.files("raybooth").joinpath("assets", "playground", name).read_bytes()


def page_config(args: AppArgs) -> dict:
    limits, defaults = args.limits, args.defaults
    return {
        "mlflow_ui_url": args.mlflow_ui_url,
        "docs_url": "/docs",
        "schedulers": list(SCHEDULERS),
        "defaults": {"steps": defaults.steps, "guidance_scale": defaults.guidance_scale,
                     "scheduler": defaults.scheduler},
        "limits": {"max_images": limits.max_images, "max_steps": limits.max_steps,
                   "max_guidance_scale": limits.max_guidance_scale, "max_side": limits.max_side,
                   "max_prompt_chars": limits.max_prompt_chars},
    }


def add_playground_routes(app: FastAPI, args: AppArgs) -> None:
    page = _read("index.html")
    assets = {path: (_read(name), kind) for path, (name, kind) in ASSETS.items()}
    config = page_config(args)

    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    for path in PAGE_PATHS:
        app.add_api_route(path, index, methods=["GET"], include_in_schema=False)

    for path, (body, kind) in assets.items():
        app.add_api_route(path, _static(body, kind), methods=["GET"], include_in_schema=False)

    async def settings() -> JSONResponse:
        return JSONResponse(config, headers=HEADERS)

    app.add_api_route(CONFIG_PATH, settings, methods=["GET"], include_in_schema=False)


def _static(body: bytes, kind: str):
    async def route() -> Response:
        return Response(body, media_type=kind, headers=HEADERS)

    return route
