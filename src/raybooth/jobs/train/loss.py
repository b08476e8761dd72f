"""The DreamBooth objective: noise the latents, predict, and compare.

    loss = MSE(instance half) [min-SNR weighted when snr_gamma is set]
           + prior_loss_weight * MSE(class half)          (prior preservation)

The target is the noise (epsilon prediction) or the velocity (v-prediction), as the model's
scheduler config says. All randomness comes from the generator passed in, drawn in a fixed order
(timesteps, noise, offset noise), so a step is reproducible from its seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NoisyBatch:
    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor


@dataclass
class LossParts:
    loss: torch.Tensor  # what is optimised
    instance: torch.Tensor  # detached, for logging
    prior: torch.Tensor  # detached; zero without prior preservation


def noisy_batch(latents: torch.Tensor, noise_scheduler, generator: torch.Generator,
                noise_offset: float = 0.0) -> NoisyBatch:
    bsz = latents.shape[0]
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=latents.device
    )
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # Offset noise (Guttenberg 2023): lets the model learn very dark and very bright images.
        noise = noise + noise_offset * torch.randn(
            (bsz, latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r} in the model's scheduler config")
    return NoisyBatch(noisy=noisy, target=target, timesteps=timesteps)


def dreambooth_loss(pred: torch.Tensor, batch: NoisyBatch, noise_scheduler, *, with_prior: bool,
                    prior_loss_weight: float, snr_gamma: float | None) -> LossParts:
    """`pred` and the batch hold the instance samples first, then (with priors) the class samples."""
    pred = pred.float()
    target = batch.target.float()
    timesteps = batch.timesteps
    prior = torch.zeros((), device=pred.device)
    if with_prior:
        pred, pred_prior = pred.chunk(2)
        target, target_prior = target.chunk(2)
        timesteps, _ = timesteps.chunk(2)
        prior = F.mse_loss(pred_prior, target_prior, reduction="mean")
    if snr_gamma is None:
        instance = F.mse_loss(pred, target, reduction="mean")
    else:
        # Min-SNR weighting (Hang et al. 2023): caps the weight of low-noise timesteps.
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=snr_gamma)
        if noise_scheduler.config.prediction_type == "v_prediction":
            weights = weights / (snr + 1)
        else:
            weights = weights / snr
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        instance = (per_sample * weights).mean()
    loss = instance + prior_loss_weight * prior if with_prior else instance
    return LossParts(loss=loss, instance=instance.detach(), prior=prior.detach())
