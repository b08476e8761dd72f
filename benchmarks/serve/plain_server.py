"""The baseline a user would write without raybooth: FastAPI + uvicorn around one diffusers
`StableDiffusionPipeline`, one pipeline call per request, torch's default thread count.

A lock keeps one call at a time (a diffusers pipeline is not thread-safe); FastAPI runs the sync
endpoint in its thread pool, so the event loop keeps accepting requests meanwhile.

    python benchmarks/serve/plain_server.py --model-dir DIR --port 8123
"""

from __future__ import annotations

import argparse
import base64
import io
import threading

import torch
import uvicorn
from diffusers import StableDiffusionPipeline
from fastapi import FastAPI
from pydantic import BaseModel


class Request(BaseModel):
    prompt: str
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5


def build(model_dir: str) -> FastAPI:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.post("/generate")
    def generate(req: Request) -> dict:
        with lock:
            image = pipe(req.prompt, num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                         generator=torch.Generator().manual_seed(req.seed)).images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return {"b64_json": base64.b64encode(buf.getvalue()).decode()}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(build(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning")
