"""Train the toy text-to-image model: text encoder + UNet on cached VAE latents.

Read top to bottom: data (scenes rendered once and encoded once: the world is small), the step
(noise, min-SNR-weighted epsilon loss, caption dropout for classifier-free guidance), EMA, and a
periodic judge evaluation that samples with the EMA weights exactly as the shipped pipeline will.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from raybooth.jobs.toy.recipe import EMA, lr_factor, min_snr_loss
from raybooth.jobs.toy.vae import to_tensor
from raybooth.platform.toy.architecture import (scheduler_config, text_encoder_config,
                                                 training_scheduler, unet_config)
from raybooth.platform.toy.scoring import score_prompt_following
from raybooth.platform.toy.world import random_scenes, render_batch

log = logging.getLogger(__name__)


@dataclass
class T2IConfig:
    steps: int = 5000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    partial_captions: float = 0.15  # share of captions with the colour and/or background left out
    dataset_size: int = 6000
    eval_every: int = 500
    eval_captions: int = 48
    guidance_scale: float = 4.0
    eval_steps: int = 25


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    # Exactly what StableDiffusionPipeline.encode_prompt does, so training and sampling agree.
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_dataset(vae, seed: int, n: int, partial: float) -> tuple[torch.Tensor, list[str]]:
    scenes = random_scenes(seed, n)
    rng = np.random.default_rng(seed)
    latents = []
    for i in range(0, n, 512):
        x = to_tensor(render_batch(scenes[i: i + 512]))
        latents.append(vae.encode(x).latent_dist.mean)
    captions = []
    for s in scenes:
        if rng.random() < partial:
            keep_colour, keep_background = [(False, False), (True, False), (False, True)][rng.integers(3)]
            captions.append(s.partial_caption(keep_colour, keep_background))
        else:
            captions.append(s.caption())
    return torch.cat(latents), captions


def make_pipeline(vae, text_encoder, tokenizer, unet, inpainting: bool = False):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
               scheduler=DDIMScheduler(**scheduler_config()), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_generate(pipe, guidance: float, steps: int) -> Callable:
    def generate(prompts: list[str], seeds: list[int]):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.inference_mode():
            return pipe(prompt=prompts, generator=gens, guidance_scale=guidance,
                        num_inference_steps=steps, output_type="pil").images
    return generate


def train_text_to_image(vae, tokenizer, seed: int, cfg: T2IConfig, on_eval: Callable | None = None):
    """Returns (ema text encoder, ema unet, curve)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    t0 = time.perf_counter()
    latents, captions = encode_dataset(vae, seed + 1, cfg.dataset_size, cfg.partial_captions)
    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])[0]
    log.info("encoded %d latents in %.0fs", len(latents), time.perf_counter() - t0)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(tokenizer)))
    unet = UNet2DConditionModel(**unet_config())
    noise_sched = training_scheduler()
    alphas_cumprod = noise_sched.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps))
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    eval_scenes = random_scenes(seed + 2, cfg.eval_captions)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    curve: list[dict] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            pipe = make_pipeline(vae, ema_text.module, tokenizer, ema_unet.module)
            score = score_prompt_following(pipeline_generate(pipe, cfg.guidance_scale, cfg.eval_steps),
                                           eval_scenes, [seed])
            point = {"step": step, "seconds": round(time.perf_counter() - t0, 1),
                     "loss": float(np.mean(losses[-200:])) if losses else None, **score.to_json()}
            curve.append(point)
            log.info("t2i %s", point)
            if on_eval:
                on_eval(curve)
            if step == cfg.steps:
                break
        idx = torch.from_numpy(rng.integers(0, len(latents), cfg.batch))
        x0 = latents[idx]
        tokens = ids[idx].clone()
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        tokens[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
        noisy = noise_sched.add_noise(x0, noise, t)
        cond = text_encoder(tokens)[0]
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = min_snr_loss(pred, noise, t, alphas_cumprod, cfg.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        losses.append(float(loss))
        if step % 100 == 0:
            rate = (step + 1) / (time.perf_counter() - t0)
            log.info("t2i step %d loss %.4f lr %.2e %.2f steps/s", step, np.mean(losses[-100:]),
                     sched.get_last_lr()[0], rate)
    return ema_text.module, ema_unet.module, curve
