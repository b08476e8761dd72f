"""The pieces of the toy training recipe shared by both models: learning-rate schedule, EMA,
min-SNR loss weighting. Each was measured to matter (see the toy-world issue and BUILD.md)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor` × the peak by the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's weights; the shipped weights are the average.

    The decay ramps up ((1+n)/(10+n)) so early averages are not dominated by the random init.
    """

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, cur in zip(self.module.parameters(), module.parameters()):
            avg.lerp_(cur.detach(), 1 - d)
        for avg, cur in zip(self.module.buffers(), module.buffers()):
            avg.copy_(cur)


def min_snr_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                 alphas_cumprod: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Epsilon-prediction MSE weighted by min(SNR, gamma)/SNR (Hang et al. 2023): stops the
    easy low-noise steps from dominating, which speeds up convergence severalfold."""
    ac = alphas_cumprod[timesteps]
    snr = ac / (1 - ac)
    weight = torch.clamp(snr, max=gamma) / snr
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()
