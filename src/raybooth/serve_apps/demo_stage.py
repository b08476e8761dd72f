"""The demo's serving stage: start the Serve app on a free port, send one generation and one
inpainting request over HTTP, save what comes back, shut Serve down.

What it serves is the demo's choice (`DemoServing`: the app's `args` and the requests to send);
`report` is the demo's report (say / save / figure / add / next_steps).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from raybooth.platform.images import png_bytes
from raybooth.serve_apps.deploy import app_url, deploy, wait_http, wait_running

APP = "raybooth"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(args: dict[str, Any], port: int) -> dict[str, Any]:
    """Every model deployment small enough that all of them and the ingress fit on two cores."""
    from raybooth.serve_apps.settings import deployment_name, load_args

    small = {"ray_actor_options": {"num_cpus": 0.4}, "max_ongoing_requests": 16,
             "user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05}}
    names = [deployment_name(task, i, spec) for task, specs in load_args(args).by_task().items()
             for i, spec in enumerate(specs)]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "raybooth.serve_apps.app:build_app",
            # The API stays open in the demo whatever the environment holds.
            "args": {**args, "auth": {"api_keys_env": f"RAYBOOTH_DEMO_NO_KEYS_{uuid.uuid4().hex[:6]}"}},
            "deployments": [{"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1}},
                            *({"name": name, **small} for name in names)],
        }],
    }


def _post(url: str, body: bytes, content_type: str) -> dict[str, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def _multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


@dataclass(frozen=True)
class DemoServing:
    """What to serve (the app's `args`) and what to ask it."""

    args: dict[str, Any]
    description: str  # what is served, in words
    generation_model: str
    generation_prompt: str
    inpainting_model: str
    inpainting_prompt: str
    steps: int
    guidance_scale: float


@dataclass(frozen=True)
class ServeOutcome:
    images: int
    unmasked_pixels_unchanged: bool
    start_s: float


def run_serve_stage(report: Any, serving: DemoServing, scene: tuple[Image.Image, Image.Image]) -> ServeOutcome:
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    config = demo_config(serving.args, _free_port())
    url = app_url(config)
    report.say(f"starting Ray Serve with {serving.description} at {url}")
    t0 = time.perf_counter()
    deploy(config)
    try:
        wait_running([APP], 600)
        wait_http(url + "/healthz", 60)
        start_s = time.perf_counter() - t0
        report.say(f"Serve app running after {start_s:.0f} s")
        common = {"steps": serving.steps, "guidance_scale": serving.guidance_scale}
        gen = _post(url + "/v1/images/generations", json.dumps({
            "prompt": serving.generation_prompt, "model": serving.generation_model, "n": 2, "seed": 7, **common,
        }).encode(), "application/json")
        figures = []
        for i, item in enumerate(gen["data"]):
            name = report.save(_image(item["b64_json"]), f"serve-generate-{i}.png")
            figures.append(report.figure(name, f"{serving.generation_prompt} (seed {7 + i})"))
        report.say(f"POST /v1/images/generations: {len(gen['data'])} images, batch_size {gen['batch_size']}, "
                   f"inference {gen['timings']['inference_s']:.2f} s")

        image, mask = scene
        body, content_type = _multipart(
            {"prompt": serving.inpainting_prompt, "model": serving.inpainting_model, "seed": "3",
             **{k: str(v) for k, v in common.items()}},
            {"image": png_bytes(image), "mask": png_bytes(mask)},
        )
        edit = _post(url + "/v1/images/edits", body, content_type)
        edited = _image(edit["data"][0]["b64_json"])
        keep = np.asarray(mask.convert("L")) == 0
        kept = bool((np.asarray(edited)[keep] == np.asarray(image.convert("RGB"))[keep]).all())
        figures.append(report.figure(report.save(image, "serve-inpaint-input.png"), "input"))
        figures.append(report.figure(report.save(mask, "serve-inpaint-mask.png"), "mask (white = repaint)"))
        figures.append(report.figure(report.save(edited, "serve-inpaint.png"),
                                     f"{serving.inpainting_prompt}; outside the mask unchanged: {kept}", kept))
        report.say(f"POST /v1/images/edits (multipart): unmasked pixels unchanged = {kept}")
        (report.out / "serve-responses.json").write_text(json.dumps({
            "generation": {k: v for k, v in gen.items() if k != "data"},
            "edit": {k: v for k, v in edit.items() if k != "data"},
        }, indent=2))
        report.add(
            f"Ray Serve over HTTP: {serving.description}",
            figures,
            f"POST /v1/images/generations (model {serving.generation_model!r}) and POST /v1/images/edits as "
            f"multipart (model {serving.inpainting_model!r}); request/response records in serve-responses.json",
        )
    finally:
        serve.shutdown()
    report.next_steps.append("raybooth serve --config configs/serve/local.yaml   (then open http://127.0.0.1:8000/)")
    report.next_steps.append("serve deploy configs/serve/gpu.yaml -a http://<head>:8265   "
                             "(GPU cluster: SD 1.5 + SD inpainting, fp16, autoscaling)")
    return ServeOutcome(images=len(gen["data"]), unmasked_pixels_unchanged=kept, start_s=round(start_s, 1))
