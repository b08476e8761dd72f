"""The baseline for benchmarks/train: the same DreamBooth step as `raybooth train`, in one plain
Python process with PyTorch alone — no Ray, no Accelerate, no checkpoints, no metrics file.

It builds the same model, caches, sample order and noise (raybooth.jobs.train.model / train_data /
train_loss with the same seed), so with one worker it computes the same losses as the Ray Train
run; the benchmark checks that before comparing speeds.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from raybooth.jobs.train.data import (
    CLASS_STREAM,
    INSTANCE_STREAM,
    NOISE_STREAM,
    ImageLatents,
    PromptEmbeddings,
    Stream,
    build_schedule,
    derive_seed,
    load_images,
)

from raybooth.jobs.train.loss import dreambooth_loss, noisy_batch
from raybooth.jobs.train.model import load_train_models, make_lr_scheduler, make_optimizer
from raybooth.platform.config import TrainConfig
from raybooth.platform.models import resolve_model


def plain_train(config: TrainConfig, instance_images: list[Path], class_images: list[Path] | None) -> dict:
    """Train config.train.max_steps steps (one process, one device); returns losses and timings."""
    from accelerate.utils import set_seed

    t = config.train
    device = torch.device("cuda" if config.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    t_setup = time.perf_counter()
    set_seed(t.seed)
    models = load_train_models(config, resolve_model(config.model, config.model_options), device)
    batch, steps = t.batch_size, t.max_steps
    instance = ImageLatents(load_images(instance_images, t.resolution, "instance image"), t.resolution,
                            t.center_crop, models.vae, device, cached=t.cache_latents)
    instance_order = build_schedule(Stream(t.seed, INSTANCE_STREAM, len(instance.images)), steps, 0, 1,
                                    batch, t.random_flip, device)
    with_prior = class_images is not None
    if with_prior:
        classes = ImageLatents(load_images(class_images, t.resolution, "class image"), t.resolution,
                               t.center_crop, models.vae, device, cached=t.cache_latents)
        class_order = build_schedule(Stream(t.seed, CLASS_STREAM, len(classes.images)), steps, 0, 1,
                                     batch, t.random_flip, device)
    prompts = PromptEmbeddings(models.tokenizer, models.text_encoder,
                               [config.subject.instance_prompt, config.subject.class_prompt], device,
                               frozen="text_encoder" not in models.trainables)
    which = torch.tensor([0] * batch + ([1] * batch if with_prior else []), device=device)
    params = models.trainable_parameters()
    optimizer = make_optimizer(config, params)
    lr_scheduler = make_lr_scheduler(config, optimizer)
    losses = torch.zeros(steps, device=device)
    setup_s = time.perf_counter() - t_setup

    t0 = time.perf_counter()
    for step in range(steps):
        generator = torch.Generator(device=device).manual_seed(derive_seed(t.seed, NOISE_STREAM, 0, step))
        latents = instance.latents(instance_order, step, generator)
        if with_prior:
            latents = torch.cat([latents, classes.latents(class_order, step, generator)])
        noisy = noisy_batch(latents, models.noise_scheduler, generator, t.noise_offset)
        hidden = prompts.hidden_states(which, models.text_encoder)
        pred = models.unet(noisy.noisy, noisy.timesteps, hidden, return_dict=False)[0]
        parts = dreambooth_loss(pred, noisy, models.noise_scheduler, with_prior=with_prior,
                                prior_loss_weight=t.prior_loss_weight, snr_gamma=t.snr_gamma)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses[step] = parts.loss.detach()
    values = losses.tolist()  # the one host sync, as the Ray loop's flush
    train_s = time.perf_counter() - t0
    return {"losses": values, "setup_s": setup_s, "train_s": train_s, "steps_per_second": steps / train_s,
            "torch_threads": torch.get_num_threads()}
