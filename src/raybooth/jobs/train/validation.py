"""Validation images during training (rank 0): the validation prompts with fixed seeds, drawn by
the model as it is at that step, saved side by side as one grid per step.

Runs on the live modules (no copy of the weights) with generators of its own, inside
`torch.random.fork_rng`, so it never changes what training does next.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from raybooth.platform.generation import GENERATION_DEFAULTS, GenerationDefaults
from raybooth.platform.schedulers import make_scheduler


def image_grid(images: list[Image.Image]) -> Image.Image:
    """The images in one row (all of one size)."""
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for i, img in enumerate(images):
        grid.paste(img, (i * w, 0))
    return grid


@torch.no_grad()
def validation_grid(unet, vae, text_encoder, tokenizer, scheduler_config, prompts: list[str],
                    seed: int, resolution: int, steps: int, device: torch.device,
                    autocast_dtype: torch.dtype | None,
                    defaults: GenerationDefaults = GENERATION_DEFAULTS) -> Image.Image:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=make_scheduler(defaults.scheduler, scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    # Image k uses seed + k, as `raybooth generate --seed` does: a grid is comparable across steps.
    generators = [torch.Generator(device="cpu").manual_seed(seed + k) for k in range(len(prompts))]
    was_training = {m: m.training for m in (unet, text_encoder)}
    for m in was_training:
        m.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = pipe(
                    prompt=list(prompts), num_inference_steps=steps,
                    guidance_scale=defaults.guidance_scale,
                    height=resolution, width=resolution, generator=generators, output_type="pil",
                )
    finally:
        for m, training in was_training.items():
            m.train(training)
    return image_grid(list(out.images))


def grid_path(run_dir: Path, step: int) -> Path:
    return run_dir / "validation" / f"step-{step:06d}.png"
