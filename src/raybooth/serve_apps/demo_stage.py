"""The demo's serving stage: start the Serve app on a free port, send one generation and one
inpainting request over HTTP, save what comes back, shut Serve down.

What it serves: the subject trained by the demo's training stage when there is one (a LoRA
adapter onto its base model, or a full model as its own deployment, from the MLflow registry when
it was registered), else the built-in tiny models.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.request
import uuid
from typing import Any

import numpy as np
from PIL import Image

from raybooth.serve_apps.deploy import app_url, deploy, wait_http, wait_running

APP = "raybooth"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _registered_or_folder(state: dict[str, Any], folder: str | None) -> str | None:
    """The registry reference (the promoted alias when the MLflow stage moved one) when it
    resolves here (its files are then in the local cache the replicas read), else the folder."""
    uri = state.get("champion_uri") or (state.get("train_summary") or {}).get("model_uri")
    if uri:
        from raybooth.platform.errors import UserError
        from raybooth.platform.models import resolve_model

        try:
            resolve_model(uri)
            return uri
        except UserError as exc:
            print(f"[demo] {uri} does not resolve ({exc.message}); serving {folder} instead", flush=True)
    return folder


def demo_args(state: dict[str, Any]) -> tuple[dict[str, Any], str, str, str]:
    """(app args, model for generation, model for inpainting, what is served, in words)."""
    summary = state.get("train_summary") or {}
    limits = {"max_side": 256}
    if summary.get("lora_path"):
        base = summary.get("base_model") or "tiny"
        subjects = {"demo-subject": _registered_or_folder(state, str(summary["lora_path"]))}
        spec = {"name": "base", "model": base, "subjects": subjects, "warmup_steps": 1}
        args = {"text_to_image": [spec], "inpainting": [spec], "limits": limits}
        return args, "demo-subject", "demo-subject", f"the trained LoRA subject {subjects['demo-subject']} on {base}"
    trained = _registered_or_folder(state, state.get("trained_model") or summary.get("model_path"))
    if trained:
        spec = {"name": "demo-subject", "model": str(trained), "warmup_steps": 1}
        # A DreamBooth model is a 4-channel model: it inpaints its subject by latent blending.
        args = {"text_to_image": [spec], "inpainting": [spec], "limits": limits}
        return args, "demo-subject", "demo-subject", f"the trained subject ({trained})"
    args = {"text_to_image": [{"name": "tiny", "model": "tiny", "warmup_steps": 1}],
            "inpainting": [{"name": "tiny-inpainting", "model": "tiny-inpainting", "warmup_steps": 1}],
            "limits": limits}
    return args, "tiny", "tiny-inpainting", "the tiny models"


def demo_config(args: dict[str, Any], port: int) -> dict[str, Any]:
    small = {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 16,
             "user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05}}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "raybooth.serve_apps.app:build_app",
            # The API stays open in the demo whatever the environment holds.
            "args": {**args, "auth": {"api_keys_env": f"RAYBOOTH_DEMO_NO_KEYS_{uuid.uuid4().hex[:6]}"}},
            "deployments": [{"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1}},
                            {"name": "TextToImage", **small}, {"name": "Inpainting", **small}],
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


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def run_serve_stage(demo: Any, scene: tuple[Image.Image, Image.Image]) -> None:
    import ray
    from ray import serve

    args, gen_model, edit_model, what = demo_args(demo.state)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    config = demo_config(args, _free_port())
    url = app_url(config)
    demo.say(f"starting Ray Serve with {what} at {url}")
    t0 = time.perf_counter()
    deploy(config)
    try:
        wait_running([APP], 600)
        wait_http(url + "/healthz", 60)
        demo.say(f"Serve app running after {time.perf_counter() - t0:.0f} s")

        prompt = "a photo of sks toy on a beach" if gen_model == "demo-subject" else "a photo of a toy robot"
        gen = _post(url + "/v1/images/generations",
                    json.dumps({"prompt": prompt, "model": gen_model, "n": 2, "seed": 7, "steps": 8}).encode(),
                    "application/json")
        paths = []
        for i, item in enumerate(gen["data"]):
            paths.append(demo.out / f"serve-generate-{i}.png")
            _image(item["b64_json"]).resize((128, 128), Image.NEAREST).save(paths[-1])
        demo.say(f"POST /v1/images/generations: {len(gen['data'])} images, batch_size {gen['batch_size']}, "
                 f"inference {gen['timings']['inference_s']:.2f} s")

        image, mask = scene
        body, content_type = _multipart(
            {"prompt": "a red barn", "model": edit_model, "seed": "3", "steps": "8", "crop_margin": "8"},
            {"image": _png(image), "mask": _png(mask)},
        )
        edit = _post(url + "/v1/images/edits", body, content_type)
        edited = _image(edit["data"][0]["b64_json"])
        keep = np.asarray(mask) == 0
        kept = bool((np.asarray(edited)[keep] == np.asarray(image.convert("RGB"))[keep]).all())
        paths.append(demo.out / "serve-inpaint.png")
        edited.save(paths[-1])
        demo.say(f"POST /v1/images/edits (multipart): unmasked pixels unchanged = {kept}")
        (demo.out / "serve-responses.json").write_text(json.dumps({
            "generation": {k: v for k, v in gen.items() if k != "data"},
            "edit": {k: v for k, v in edit.items() if k != "data"},
        }, indent=2))
        demo.state["serve"] = {"served": what, "generation_model": gen_model, "inpainting_model": edit_model,
                               "unmasked_pixels_unchanged": kept}
        demo.add(
            f"Ray Serve over HTTP: {what}",
            paths,
            f"two images from POST /v1/images/generations (model {gen_model!r}, seeds 7 and 8) and one "
            f"from POST /v1/images/edits (model {edit_model!r}); the request/response records are in "
            "serve-responses.json",
        )
    finally:
        serve.shutdown()
    demo.next_steps.append("raybooth serve --config configs/serve/local.yaml   "
                           "(then open http://127.0.0.1:8000/docs)")
    demo.next_steps.append("serve deploy configs/serve/gpu.yaml -a http://<head>:8265   "
                           "(GPU cluster: SD 1.5 + SD inpainting, fp16, autoscaling)")
