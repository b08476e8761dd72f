"""Evaluation during training (`evaluation.every`): the rank-0 worker judges the model as it is
at that step, so Ray Train reports `eval/dino`, `eval/clip_i`, `eval/clip_t` with the step's
checkpoint and a Ray Tune scheduler can stop a trial on them.

Runs on the live modules (no copy of the weights), in eval mode, inside `torch.random.fork_rng`
with generators of its own, so it never changes what training does next (as validation does).
The encoders and the real photos' embeddings are loaded once per worker. The numbers are the same
definitions as `raybooth evaluate` (raybooth.jobs.evaluate.metrics), means only: the bootstrap and
the report are for the end-of-training evaluation of the exported model. A toy-based model also
reports the toy judge's `eval/toy_subject` and `eval/toy_prompt` (raybooth.jobs.evaluate.toy_scores).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from raybooth.jobs.evaluate import metrics as M
from raybooth.jobs.evaluate.encoders import CLIP, DINO, load_encoder, resolve_encoder
from raybooth.jobs.evaluate.prompts import build_prompts
from raybooth.jobs.evaluate.report import CLIP_I, CLIP_T
from raybooth.jobs.evaluate.toy_scores import training_is_toy_based
from raybooth.jobs.evaluate.training import METRIC_PREFIX
from raybooth.platform.config import TrainConfig
from raybooth.platform.images import open_image


class LiveEvaluator:
    def __init__(self, config: TrainConfig, instance_images: dict[str, bytes], device: torch.device):
        ev = config.evaluation
        s = config.subject
        self.config = config
        self.every = ev.every
        self.device = device
        self.prompts = build_prompts(prompt_set=ev.prompt_set, prompts=ev.prompts, identifier=s.identifier,
                                     class_noun=ev.class_noun, instance_prompt=s.instance_prompt)
        options = config.model_options
        self.dino = load_encoder(resolve_encoder(ev.dino_encoder, DINO, options, ev.dino_revision), device)
        self.clip = load_encoder(resolve_encoder(ev.clip_encoder, CLIP, options, ev.clip_revision), device)
        reals = [open_image(io.BytesIO(data), name=name) for name, data in instance_images.items()]
        self.real_dino = self.dino.embed_images(reals)
        self.real_clip = self.clip.embed_images(reals)
        # A toy-based model: the toy judge's scores too, the objective a CPU sweep can trust.
        self.toy = training_is_toy_based(config.model, ev.prompt_set, ev.prompts is not None)

    @torch.no_grad()
    def evaluate(self, unet, vae, text_encoder, tokenizer, scheduler_config, autocast_dtype) -> dict[str, float]:
        from diffusers import StableDiffusionPipeline

        from raybooth.platform.schedulers import make_scheduler

        ev, t = self.config.evaluation, self.config.train
        n = ev.images_per_prompt
        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            scheduler=make_scheduler(ev.scheduler, scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        flat = [(p, ev.seed + k) for p in self.prompts for k in range(n)]
        images: list[Any] = []
        size = ev.resolution or t.resolution
        was_training = {m: m.training for m in (unet, text_encoder)}
        for m in was_training:
            m.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    for start in range(0, len(flat), ev.batch_size):
                        chunk = flat[start : start + ev.batch_size]
                        out = pipe(
                            prompt=[p.prompt for p, _ in chunk], num_inference_steps=ev.steps,
                            guidance_scale=ev.guidance_scale, height=size, width=size,
                            generator=[torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk],
                            output_type="pil",
                        )
                        images.extend(out.images)
        finally:
            for m, training in was_training.items():
                m.train(training)
        gen_clip = self.clip.embed_images(images)
        texts = self.clip.embed_texts([p.class_prompt for p, _ in flat])
        out = {
            f"{METRIC_PREFIX}dino": M.dino_score(self.dino.embed_images(images), self.real_dino),
            f"{METRIC_PREFIX}{CLIP_I}": M.clip_i_score(gen_clip, self.real_clip),
            f"{METRIC_PREFIX}{CLIP_T}": M.clip_t_score(gen_clip, texts),
        }
        if self.toy:
            out.update(self._toy_scores(images, flat))
        return out

    def _toy_scores(self, images: list[Any], flat: list[Any]) -> dict[str, float]:
        """Means of the toy judge's per-image scores (raybooth.jobs.evaluate.toy_scores)."""
        from raybooth.jobs.evaluate import toy_scores as T

        subject, prompt, _ = T.score_images(images, [p.prompt for p, _ in flat],
                                            [p.class_prompt for p, _ in flat], self.config.subject.identifier)
        out = {f"{METRIC_PREFIX}{T.TOY_SUBJECT}": float(np.mean(subject))}
        known = prompt[~np.isnan(prompt)]
        if known.size:
            out[f"{METRIC_PREFIX}{T.TOY_PROMPT}"] = float(np.mean(known))
        return out


def live_evaluator(config: TrainConfig, instance_images: dict[str, bytes], device: torch.device) -> LiveEvaluator | None:
    """The worker's evaluator, or None when the config asks for no evaluation during training."""
    if config.evaluation is None or not config.evaluation.every:
        return None
    return LiveEvaluator(config, instance_images, device)
