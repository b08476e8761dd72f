"""Train the toy VAE and fold the latent normalisation into it.

Latent diffusion trains best on latents with zero mean and unit variance per channel. Stable
Diffusion's pipelines only multiply by one `scaling_factor`, so instead of shipping a shift the
per-channel mean and scale are folded into the VAE's 1×1 `quant_conv` (encoder side) and
`post_quant_conv` (decoder side): the encoder then emits normalised latents and the decoder
accepts them, with `scaling_factor = 1.0`, and a stock `from_pretrained` pipeline works.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from raybooth.jobs.toy.recipe import lr_factor
from raybooth.platform.toy.architecture import vae_config
from raybooth.platform.toy.world import COLOURS, RESOLUTION, random_scenes, render_batch

log = logging.getLogger(__name__)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1], the pipelines' convention."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def random_compositions(rng: np.random.Generator, n: int, resolution: int = RESOLUTION) -> np.ndarray:
    """(N, H, W, 3) uint8: 1-4 flat palette shapes (discs, boxes, triangles) at random places and
    sizes, overlapping, on a plain background. The VAE must encode more than the caption grammar
    draws (a DreamBooth subject such as a two-coloured circle, an inpainted region), so half of
    its training images are these generic compositions; the grammar's scenes are the other half."""
    palette = np.array(list(COLOURS.values()), dtype=np.uint8)
    yy, xx = np.mgrid[:resolution, :resolution] + 0.5
    out = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = palette[rng.integers(len(palette))]
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = rng.uniform(0, resolution, 2)
            r = rng.uniform(2, resolution / 2.5)
            kind = rng.integers(3)
            if kind == 0:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            elif kind == 1:
                ry = rng.uniform(2, resolution / 2.5)
                mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= ry)
            else:
                t = (yy - (cy - r)) / (2 * r)
                mask = (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)
            out[i][mask] = palette[rng.integers(len(palette))]
    return out


def training_images(seed: int, step: int, batch: int) -> np.ndarray:
    rng = np.random.default_rng([seed, step])
    half = batch // 2
    return np.concatenate([render_batch(random_scenes(seed * 1_000_003 + step, batch - half)),
                           random_compositions(rng, half)])


def train_vae(seed: int, steps: int, batch: int = 16, lr: float = 1e-3, kl_weight: float = 1e-5):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 50, steps, floor=0.05))
    t0 = time.perf_counter()
    curve = []
    for step in range(steps):
        x = to_tensor(training_images(seed, step, batch))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        loss = rec + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            curve.append({"step": step, "recon": rec.item(), "seconds": time.perf_counter() - t0})
            log.info("vae step %d recon %.4f (%.0fs)", step, rec.item(), time.perf_counter() - t0)
    vae.eval().requires_grad_(False)
    return vae, curve


@torch.no_grad()
def fold_normalisation(vae, seed: int, n: int = 2048) -> dict:
    """Measure the latents' per-channel mean and std and fold them into the VAE (in place)."""
    x = to_tensor(render_batch(random_scenes(seed, n)))
    mean = torch.cat([vae.encode(x[i: i + 256]).latent_dist.mean for i in range(0, n, 256)])
    m = mean.mean(dim=(0, 2, 3))
    s = mean.std(dim=(0, 2, 3)).clamp_min(1e-4)
    c = m.numel()
    q = vae.quant_conv  # out: [mean (c), logvar (c)]
    q.weight[:c] /= s[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - m) / s
    q.bias[c:] -= 2 * torch.log(s)
    p = vae.post_quant_conv  # z = z' * s + m
    p.bias += p.weight[:, :, 0, 0] @ m
    p.weight *= s[None, :, None, None]
    return {"latent_mean": m.tolist(), "latent_std": s.tolist()}


@torch.no_grad()
def pin_posterior(vae, std: float = 1e-3) -> None:
    """Make the encoder (nearly) deterministic: log-variance a constant, std `std` in latent units.

    The diffusion models here train on posterior means, but DreamBooth's trainer (like diffusers')
    samples `mean + std * eps`, and the inpainting pipeline samples the masked image's latents.
    With this small VAE the learned posterior std is ~0.2 of the normalised latent scale, enough
    noise to turn a fine-tuned model's images to mud; pinned, a sample is the mean. The decoder
    is unaffected (it decodes means well: see reconstruction_accuracy).
    """
    c = vae.quant_conv.out_channels // 2
    vae.quant_conv.weight[c:] = 0
    vae.quant_conv.bias[c:] = 2 * math.log(std)


@torch.no_grad()
def reconstruction_accuracy(vae, seed: int, n: int = 256) -> dict:
    """What survives encode -> decode, in the judge's eyes: the share of pixels keeping their
    palette colour, and of images whose background, colour and shape the judge still reads.
    This is the ceiling of every score the diffusion model can reach."""
    from raybooth.platform.toy.judge import classify_pixels, judge

    scenes = random_scenes(seed, n)
    images = render_batch(scenes)
    recon = vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample
    out = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    same = [(classify_pixels(a) == classify_pixels(b)).mean() for a, b in zip(images, out)]
    reads = [judge(o) for o in out]
    from raybooth.platform.toy.subject import SUBJECT, render_subject, subject_score

    subjects = np.stack([np.asarray(render_subject(SUBJECT, bg, 0.6)) for bg in SUBJECT.backgrounds()])
    rs = vae.decode(vae.encode(to_tensor(subjects)).latent_dist.mean).sample
    rs = ((rs.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return {
        "subject_score": float(np.mean([subject_score(o) for o in rs])),
        "pixels": float(np.mean(same)),
        "background": float(np.mean([r.background == s.background for r, s in zip(reads, scenes)])),
        "colour": float(np.mean([r.colour == s.colour for r, s in zip(reads, scenes)])),
        "shape": float(np.mean([r.shape == s.shape for r, s in zip(reads, scenes)])),
    }
