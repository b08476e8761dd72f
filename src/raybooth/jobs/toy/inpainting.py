"""Fine-tune the toy inpainting model from the text-to-image UNet, the way Stable Diffusion
inpainting was made: the first convolution grows from 4 to 9 input channels (latents, mask,
masked-image latents), the 5 new channels start at zero so step 0 behaves like the base model,
and the UNet learns from random masks. The text encoder and VAE stay frozen: both models share them.

The inputs are built exactly as `StableDiffusionInpaintPipeline` builds them at sampling time:
masked image = image × (mask < 0.5), encoded by the VAE; mask resized to the latent grid (nearest).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from raybooth.jobs.toy.recipe import EMA, lr_factor, min_snr_loss
from raybooth.jobs.toy.text_to_image import make_pipeline, tokenize
from raybooth.jobs.toy.vae import to_tensor
from raybooth.platform.toy.architecture import training_scheduler, unet_config
from raybooth.platform.toy.scoring import inpaint_cases, score_inpainting
from raybooth.platform.toy.world import RESOLUTION, Scene, random_scenes, render_batch, shape_mask

log = logging.getLogger(__name__)


@dataclass
class InpaintConfig:
    steps: int = 2000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 100
    ema_decay: float = 0.995
    snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    eval_every: int = 500
    eval_cases: int = 48
    guidance_scale: float = 4.0
    eval_steps: int = 25


def grow_unet(base) -> torch.nn.Module:
    """A 9-channel UNet holding `base`'s weights, new input channels zero."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**unet_config(in_channels=9))
    state = base.state_dict()
    w = state["conv_in.weight"]
    grown = torch.zeros(w.shape[0], 9, *w.shape[2:])
    grown[:, : w.shape[1]] = w
    state["conv_in.weight"] = grown
    unet.load_state_dict(state)
    return unet


def random_mask(scene: Scene, rng: np.random.Generator, resolution: int = RESOLUTION) -> np.ndarray:
    """One training mask: the object (dilated), a box around it, a random box or ellipse, or all."""
    # Object-shaped masks dominate: repainting an object is what users (and the tests) ask for.
    kind = rng.choice(5, p=[0.45, 0.2, 0.15, 0.1, 0.1])
    yy, xx = np.mgrid[:resolution, :resolution]
    if kind == 0:
        m = shape_mask(scene.shape, scene.size, resolution)
        for _ in range(int(rng.integers(0, 3))):
            d = m.copy()
            d[1:] |= m[:-1]; d[:-1] |= m[1:]; d[:, 1:] |= m[:, :-1]; d[:, :-1] |= m[:, 1:]
            m = d
        return m
    if kind == 1:
        half = scene.size * resolution / 2 + rng.uniform(0, 4)
        c = resolution / 2
        return (np.abs(xx + 0.5 - c) <= half) & (np.abs(yy + 0.5 - c) <= half)
    if kind in (2, 3):
        cy, cx = rng.uniform(0, resolution, 2)
        hy, hx = rng.uniform(3, resolution / 2, 2)
        if kind == 2:
            return (np.abs(yy - cy) <= hy) & (np.abs(xx - cx) <= hx)
        return ((yy - cy) / hy) ** 2 + ((xx - cx) / hx) ** 2 <= 1
    return np.ones((resolution, resolution), dtype=bool)


def caption_for(scene: Scene, object_mask: bool, rng: np.random.Generator) -> str:
    # The short form `a {colour} {shape}` is what a user types to repaint an object.
    if object_mask and rng.random() < 0.5:
        return scene.partial_caption(keep_colour=True, keep_background=False)
    return scene.caption()


def train_inpainting(vae, text_encoder, tokenizer, base_unet, seed: int, cfg: InpaintConfig,
                     on_eval: Callable | None = None):
    """Returns (ema inpainting unet, curve)."""

    torch.manual_seed(seed)
    unet = grow_unet(base_unet).train().requires_grad_(True)
    noise_sched = training_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps))
    ema = EMA(unet, cfg.ema_decay)
    cases = inpaint_cases(seed + 2, cfg.eval_cases)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    empty = tokenize(tokenizer, [""])
    curve: list[dict] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            pipe = make_pipeline(vae, text_encoder, tokenizer, ema.module, inpainting=True)

            def inpaint(images, masks, prompts, seeds):
                gens = [torch.Generator().manual_seed(s) for s in seeds]
                with torch.inference_mode():
                    out = pipe(prompt=prompts, image=images, mask_image=masks, generator=gens,
                               guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.eval_steps,
                               height=RESOLUTION, width=RESOLUTION, output_type="pil").images
                # The pipeline repaints the whole image; keep the outside as the runner does.
                return [keep_outside(o, i, m) for o, i, m in zip(out, images, masks)]

            score = score_inpainting(inpaint, cases, [seed], RESOLUTION)
            point = {"step": step, "seconds": round(time.perf_counter() - t0, 1),
                     "loss": float(np.mean(losses[-200:])) if losses else None, **score.to_json()}
            curve.append(point)
            log.info("inpaint %s", point)
            if on_eval:
                on_eval(curve)
            if step == cfg.steps:
                break
        scenes = random_scenes(seed * 7919 + step, cfg.batch)
        masks, prompts = [], []
        for s in scenes:
            m = random_mask(s, rng)
            masks.append(m)
            prompts.append(caption_for(s, True, rng))
        x = to_tensor(render_batch(scenes))
        mask = torch.from_numpy(np.stack(masks)).float()[:, None]
        with torch.no_grad():
            x0 = vae.encode(x).latent_dist.mean
            masked = vae.encode(x * (mask < 0.5)).latent_dist.sample(generator=gen)
            tokens = tokenize(tokenizer, prompts)
            drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
            tokens[drop] = empty[0]
            cond = text_encoder(tokens)[0]
        mask_lat = F.interpolate(mask, size=x0.shape[-2:])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
        noisy = noise_sched.add_noise(x0, noise, t)
        pred = unet(torch.cat([noisy, mask_lat, masked], 1), t, encoder_hidden_states=cond).sample
        loss = min_snr_loss(pred, noise, t, noise_sched.alphas_cumprod, cfg.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(unet)
        losses.append(float(loss))
        if step % 100 == 0:
            log.info("inpaint step %d loss %.4f %.2f steps/s", step, np.mean(losses[-100:]),
                     (step + 1) / (time.perf_counter() - t0))
    return ema.module, curve


def keep_outside(generated, original, mask):
    """The generated pixels inside the mask, the original ones outside."""
    from PIL import Image

    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask.convert("L"))
