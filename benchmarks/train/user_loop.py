"""The DreamBooth loop a user writes without raybooth, after diffusers' own
`examples/dreambooth/train_dreambooth.py` run as its README says: text encoder frozen, prior
preservation, every step encodes its images with the VAE and its prompts with the text encoder,
AdamW, torch's default settings (its default thread count). Nothing raybooth-specific: only
diffusers, transformers, torch, PIL and numpy — the baseline issue "speed" asks for.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _tensor(path: Path, resolution: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((resolution, resolution), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def user_train(model_dir: str, instance: list[Path], classes: list[Path], instance_prompt: str,
               class_prompt: str, steps: int, batch: int, resolution: int, lr: float = 1e-4,
               prior_loss_weight: float = 1.0, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    t_setup = time.perf_counter()
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    inst = [_tensor(p, resolution) for p in instance]
    cls = [_tensor(p, resolution) for p in classes]
    ids = tokenizer([instance_prompt] * batch + [class_prompt] * batch, padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    setup_s = time.perf_counter() - t_setup

    unet.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        pixels = torch.stack(random.sample(inst, k=min(batch, len(inst))) * (batch // len(inst) + 1))[:batch]
        pixels = torch.cat([pixels, torch.stack(random.sample(cls, k=min(batch, len(cls))))[:batch]])
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, timesteps, hidden).sample
        pred, pred_prior = pred.chunk(2)
        target, target_prior = noise.chunk(2)
        loss = F.mse_loss(pred, target) + prior_loss_weight * F.mse_loss(pred_prior, target_prior)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())  # the example logs the loss every step
    train_s = time.perf_counter() - t0
    return {"setup_s": setup_s, "train_s": train_s, "steps_per_second": steps / train_s,
            "torch_threads": torch.get_num_threads(), "final_loss": losses[-1]}
