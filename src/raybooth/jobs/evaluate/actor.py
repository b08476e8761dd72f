"""The evaluation actor: one loaded diffusion model and both encoders; blocks of work in, PNG
bytes and embeddings out.

Two kinds of block: `GenerateTask` (make images from prompts and seeds, embed them with DINO and
CLIP, embed their identifier-free prompts with CLIP's text tower) and `EmbedTask` (embed the real
subject images: the driver sends their bytes, so the photos need not be on the actors' nodes).
The blocks are fixed by the driver (same prompts, seeds and batch layout every run), and each
actor uses exactly `cpu_threads` torch threads on the CPU, so a rerun gives the same bytes and the
same numbers however many actors share the work.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raybooth.jobs.evaluate.encoders import ResolvedEncoder
from raybooth.platform.config import ModelOptions
from raybooth.platform.errors import ModelError, UserError

REAL_BLOCK = -1  # the key of the real-image block: sorted first, so it is embedded first


@dataclass(frozen=True)
class EvalSpec:
    """Everything an actor needs, pinned by the driver (revisions resolved, paths absolute)."""

    model_ref: str
    model_kind: str
    model_revision: str | None
    lora: str | None  # an adapter folder, or None
    dino: ResolvedEncoder
    clip: ResolvedEncoder
    resolution: int | None
    steps: int
    guidance_scale: float
    scheduler: str
    device: str  # cpu | cuda
    dtype: str  # fp32 | fp16
    cpu_threads: int | None


@dataclass(frozen=True)
class GenerateTask:
    indices: list[int]
    prompts: list[str]
    class_prompts: list[str]
    seeds: list[int]


@dataclass(frozen=True)
class EmbedTask:
    indices: list[int]
    pngs: list[bytes]


@dataclass
class EmbeddedImage:
    """One image's result: its PNG (generated images only) and its embeddings."""

    index: int
    dino: np.ndarray
    clip: np.ndarray
    text: np.ndarray | None = None  # CLIP text embedding of its identifier-free prompt
    png: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def encode_png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # no timestamp: equal pixels, equal bytes
    return buf.getvalue()


class EvalActor:
    """Used as a Ray actor (`ray.remote(EvalActor)`); plain Python otherwise (the benchmark's
    plain loop runs exactly this code in one process)."""

    def __init__(self, spec: EvalSpec, options: ModelOptions):
        import diffusers.utils.logging
        import torch
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        if spec.cpu_threads:
            torch.set_num_threads(spec.cpu_threads)
        self.spec = spec
        self.error: UserError | None = None
        try:
            self._load(spec, options)
        except UserError as exc:
            # Raised from each call: a call's exception reaches the driver as itself, a failed
            # constructor only as text.
            self.error = exc

    def _load(self, spec: EvalSpec, options: ModelOptions) -> None:
        from raybooth.jobs.evaluate.encoders import load_encoder
        from raybooth.platform.pipelines import DiffusionRunner, GenerationParams

        device = "cuda" if spec.device == "cuda" else "cpu"
        self.runner = DiffusionRunner(spec.model_ref, options=options, device=device, dtype=spec.dtype)
        got = self.runner.resolved.revision
        if spec.model_kind in {"hub", "tiny"} and got != spec.model_revision:
            raise ModelError(
                f"model {spec.model_ref!r} resolved to revision {got!r} on this node but to "
                f"{spec.model_revision!r} on the driver",
                field="model",
            )
        lora = self.runner.load_lora(spec.lora, name="evaluated") if spec.lora else None
        if lora is None and self.runner.adapters:
            lora = next(iter(self.runner.adapters))  # a registered LoRA model's own adapter
        self.params = GenerationParams(
            steps=spec.steps, guidance_scale=spec.guidance_scale, scheduler=spec.scheduler,
            height=spec.resolution, width=spec.resolution, lora=lora,
        )
        self.params.check()
        self.dino = load_encoder(spec.dino, device)
        self.clip = load_encoder(spec.clip, device)

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def ready(self) -> dict[str, Any]:
        self._check()
        return {
            "pid": os.getpid(),
            **self.runner.describe(),
            "load_s": self.runner.load_s + self.dino.load_s + self.clip.load_s,
        }

    def embed(self, images: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        return self.dino.embed_images(images), self.clip.embed_images(images)

    def run(self, key: int, task: GenerateTask | EmbedTask) -> list[EmbeddedImage]:
        from PIL import Image

        self._check()
        if isinstance(task, EmbedTask):
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in task.pngs]
            dino, clip = self.embed(images)
            return [EmbeddedImage(i, dino[k], clip[k]) for k, i in enumerate(task.indices)]
        images = self.runner.text_to_image(list(task.prompts), list(task.seeds), self.params)
        dino, clip = self.embed(images)
        texts = self.clip.embed_texts(list(task.class_prompts))
        return [
            EmbeddedImage(i, dino[k], clip[k], texts[k], encode_png(images[k]))
            for k, i in enumerate(task.indices)
        ]
