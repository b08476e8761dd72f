"""Training data for DreamBooth: instance and class images, their transforms, the order in which
they are drawn, and the caches that make a step cheap.

Two ideas keep resume exact and the step free of host work:

- **The data order is a pure function of (seed, position).** Sample number `k` of a stream is
  image `perm_e[k mod N]` of epoch `e = k // N`, with `perm_e` a permutation seeded by
  `(seed, stream, e)`; the flip and crop of sample `k` are drawn the same way. Worker `rank` of
  `world` takes positions `(micro_step * world + rank) * batch + j`. Nothing depends on iterator
  state, so a worker restarted at step `s` draws exactly what it would have drawn.
- **Everything that does not change is computed once.** Images are decoded and resized once;
  with a centre crop their VAE latent distributions (and those of their mirror images, when
  flipping) are encoded once and kept on the device; the prompts are tokenized once, and embedded
  once when the text encoder is frozen. A step then only indexes device tensors.

Transforms use PIL + numpy + torch only (no torchvision).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raybooth.platform.images import list_images, open_image

# Every random draw of training comes from `derive_seed(seed, STREAM, …)`: one id per independent
# stream, so adding a draw to one stream never shifts another (and a resumed run redraws exactly).
# Data: which image, its flip and its crop, for the instance and the class images. Noise: the
# timesteps and noise of each micro-step (drawn in the loop, keyed by rank and micro-step).
INSTANCE_STREAM = 1
CLASS_STREAM = 2
_ORDER, _FLIP, _CROP = 11, 12, 13
NOISE_STREAM = 21


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, stream, epoch, …): stable across processes and runs."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


# ---------------------------------------------------------------------------------------------
# Images and transforms


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if new == (w, h) else img.resize(new, Image.BILINEAR)


def crop_square(img: Image.Image, size: int, fx: float = 0.5, fy: float = 0.5) -> Image.Image:
    """A size×size crop; (fx, fy) in [0, 1] place it (0.5, 0.5 is the centre crop)."""
    w, h = img.size
    left = int(round((w - size) * fx))
    top = int(round((h - size) * fy))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 CHW tensor in [-1, 1] (what the VAE expects)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def load_images(sources: list[Path] | list[bytes], resolution: int, name: str,
                names: list[str] | None = None) -> list[Image.Image]:
    """Decode (files or their bytes) and resize once (shorter side = resolution); errors name the file."""
    names = names or [str(s) for s in sources]
    return [resize_shorter_side(open_image(s, name=f"{name} {n}"), resolution) for s, n in zip(sources, names)]


def instance_image_paths(directory: str | Path) -> list[Path]:
    return list_images(directory, "subject.instance_data_dir")


# ---------------------------------------------------------------------------------------------
# Deterministic sample order


@dataclass(frozen=True)
class Stream:
    """Which image, mirrored or not, cropped where, for every position of one sample stream."""

    seed: int
    stream: int
    size: int  # number of images

    def draw(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image index, flip 0/1, crop offsets (fx, fy)) for an array of positions."""
        epochs = positions // self.size
        within = positions % self.size
        index = np.empty_like(positions)
        flip = np.empty_like(positions)
        crop = np.empty(positions.shape + (2,), dtype=np.float64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            perm = np.random.default_rng(derive_seed(self.seed, self.stream, _ORDER, epoch)).permutation(self.size)
            flips = np.random.default_rng(derive_seed(self.seed, self.stream, _FLIP, epoch)).integers(0, 2, self.size)
            crops = np.random.default_rng(derive_seed(self.seed, self.stream, _CROP, epoch)).random((self.size, 2))
            index[sel] = perm[within[sel]]
            flip[sel] = flips[within[sel]]
            crop[sel] = crops[within[sel]]
        return index, flip, crop


def worker_positions(micro_steps: np.ndarray, rank: int, world: int, batch: int) -> np.ndarray:
    """Stream positions of a worker's samples: shape (len(micro_steps), batch)."""
    base = (micro_steps[:, None] * world + rank) * batch
    return base + np.arange(batch)[None, :]


@dataclass
class Schedule:
    """Per micro-step sample indices and flips of one worker, precomputed on the device (and
    kept on the host for the uncached path, which picks PIL images by index)."""

    index: torch.Tensor  # (micro_steps, batch) long, on the device
    flip: torch.Tensor  # (micro_steps, batch) long, on the device
    host_index: np.ndarray
    host_flip: np.ndarray
    crop: np.ndarray  # (micro_steps, batch, 2) float: random-crop placement


def build_schedule(stream: Stream, total_micro_steps: int, rank: int, world: int, batch: int,
                   random_flip: bool, device: torch.device) -> Schedule:
    positions = worker_positions(np.arange(total_micro_steps), rank, world, batch)
    index, flip, crop = stream.draw(positions)
    if not random_flip:
        flip = np.zeros_like(flip)
    return Schedule(
        index=torch.as_tensor(index, dtype=torch.long, device=device),
        flip=torch.as_tensor(flip, dtype=torch.long, device=device),
        host_index=index,
        host_flip=flip,
        crop=crop,
    )


# ---------------------------------------------------------------------------------------------
# Latents


class ImageLatents:
    """The images of one stream, and how to turn a micro-step's samples into VAE latents.

    With `cached=True` (centre crop) the latent distribution (mean, std) of every image and of
    its mirror image is encoded once; a step gathers rows and samples. Without the cache each
    step crops, flips and encodes its images. Both draw the sampling noise from the step's
    generator in the same way, so they compute the same latents.
    """

    def __init__(self, images: list[Image.Image], resolution: int, center_crop: bool, vae,
                 device: torch.device, cached: bool, encode_batch: int = 8):
        self.images = images
        self.resolution = resolution
        self.center_crop = center_crop
        self.vae = vae
        self.device = device
        self.cached = cached and center_crop
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        if self.cached:
            pixels = torch.stack([to_tensor(crop_square(img, resolution)) for img in images])
            pixels = torch.stack([pixels, pixels.flip(-1)], dim=1)  # (N, 2, 3, H, W): plain, mirrored
            flat = pixels.flatten(0, 1)
            means, stds = [], []
            for chunk in flat.split(encode_batch):
                mean, std = self._encode(chunk.to(device))
                means.append(mean)
                stds.append(std)
            self.mean = torch.cat(means).unflatten(0, (len(images), 2))
            self.std = torch.cat(stds).unflatten(0, (len(images), 2))

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def latents(self, schedule: Schedule, micro_step: int, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents (batch, 4, h, w) for one micro-step's samples."""
        if self.cached:
            mean = self.mean[schedule.index[micro_step], schedule.flip[micro_step]]
            std = self.std[schedule.index[micro_step], schedule.flip[micro_step]]
        else:
            rows = []
            samples = zip(schedule.host_index[micro_step], schedule.host_flip[micro_step], schedule.crop[micro_step])
            for i, f, (fx, fy) in samples:
                img = self.images[i]
                img = crop_square(img, self.resolution) if self.center_crop else crop_square(img, self.resolution, fx, fy)
                t = to_tensor(img)
                rows.append(t.flip(-1) if f else t)
            mean, std = self._encode(torch.stack(rows).to(self.device))
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * eps - self.shift) * self.scaling


# ---------------------------------------------------------------------------------------------
# Prompts


class PromptEmbeddings:
    """The instance and class prompts: token ids always, embeddings too when the encoder is frozen."""

    def __init__(self, tokenizer, text_encoder, prompts: list[str], device: torch.device, frozen: bool):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        self.ids = ids.to(device)  # (P, L)
        self.embeddings: torch.Tensor | None = None
        if frozen:
            with torch.no_grad():
                self.embeddings = text_encoder(self.ids, return_dict=False)[0].float()

    def hidden_states(self, which: torch.Tensor, text_encoder) -> torch.Tensor:
        """Encoder hidden states for a batch that uses prompt `which[i]` for sample i."""
        if self.embeddings is not None:
            return self.embeddings[which]
        return text_encoder(self.ids[which], return_dict=False)[0]
