"""The shipped toy models: they resolve like `tiny`, follow prompts, and inpaint.

Thresholds are the toy-world issue's, asserted with fixed seeds on the committed weights through
the same `DiffusionRunner` every part of raybooth uses. The measured values are printed (-s).
"""

from __future__ import annotations

import numpy as np
import pytest

from raybooth.platform.generation import defaults_for
from raybooth.platform.toy.models import ASSETS, TOY_NAMES, toy_weights_present

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not toy_weights_present(), reason="toy weights not built (raybooth toy build)"),
]

CAPTION_SEED, IMAGE_SEEDS = 20261201, [11, 12]


@pytest.fixture(scope="module")
def toy_runner():
    from raybooth.platform.pipelines import DiffusionRunner

    return DiffusionRunner("toy")


@pytest.fixture(scope="module")
def toy_inpainting_runner():
    from raybooth.platform.pipelines import DiffusionRunner

    return DiffusionRunner("toy-inpainting")


def _params(cls, model_dir):
    # The toy models' own recommended settings (guidance ~4, 25 DDIM steps), read from the model
    # folder: raybooth's global defaults suit Stable Diffusion, not these.
    d = defaults_for(model_dir)
    return cls(steps=d.steps, guidance_scale=d.guidance_scale, scheduler=d.scheduler)


def test_shipped_weights_are_small_safetensors():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert (ASSETS / "build.json").is_file()  # the command and seed that made them


def test_toy_references_resolve_like_tiny():
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from raybooth.platform.models import check_model_ref, resolve_model

    paths = {}
    for name in TOY_NAMES:
        assert check_model_ref(name) == name
        resolved = resolve_model(name)
        assert resolved.kind == "toy" and (resolved.path / "model_index.json").is_file()
        assert resolve_model(name).path == resolved.path  # assembled once, then reused
        assert defaults_for(resolved.path).guidance_scale == 4.0
        paths[name] = resolved.path
    t2i = StableDiffusionPipeline.from_pretrained(paths["toy"], use_safetensors=True)
    inp = StableDiffusionInpaintPipeline.from_pretrained(paths["toy-inpainting"], use_safetensors=True)
    assert t2i.unet.config.in_channels == 4 and inp.unet.config.in_channels == 9
    assert t2i.vae.config.scaling_factor == 1.0  # the latent normalisation lives in the VAE
    assert t2i.scheduler.config.clip_sample is False
    # One text encoder and one VAE shared by both models.
    for a, b in ((t2i.text_encoder, inp.text_encoder), (t2i.vae, inp.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sa)
    # Grammar words are single tokens: the word-level part of the tokenizer.
    ids = t2i.tokenizer("a red circle on a blue background").input_ids
    assert len(ids) == 2 + 7


def test_toy_follows_prompts(toy_runner):
    from raybooth.platform.pipelines import GenerationParams
    from raybooth.platform.toy.scoring import score_prompt_following
    from raybooth.platform.toy.world import random_scenes

    params = _params(GenerationParams, toy_runner.resolved.path)
    scenes = random_scenes(CAPTION_SEED, 48)
    score = score_prompt_following(lambda p, s: toy_runner.text_to_image(p, s, params), scenes, IMAGE_SEEDS)
    print(f"\ntoy prompt following over {score.n} images: background {score.background:.3f}, "
          f"object colour {score.colour:.3f}, shape {score.shape:.3f}")
    assert score.n == 96
    assert score.background >= 0.95
    assert score.colour >= 0.90
    assert score.shape >= 0.85


def test_toy_inpainting_repaints_the_object_and_keeps_the_rest(toy_inpainting_runner):
    from raybooth.platform.pipelines import InpaintParams
    from raybooth.platform.toy.scoring import inpaint_cases, score_inpainting

    runner = toy_inpainting_runner
    params = _params(InpaintParams, runner.resolved.path)
    cases = inpaint_cases(CAPTION_SEED, 48)
    score = score_inpainting(lambda i, m, p, s: runner.inpaint(i, m, p, s, params), cases, IMAGE_SEEDS,
                             resolution=runner.default_size)
    print(f"\ntoy-inpainting over {score.n} cases: asked colour inside the mask "
          f"{score.colour_inside:.3f}, outside unchanged {score.unchanged_outside:.3f}")
    assert score.colour_inside >= 0.80
    assert score.unchanged_outside == 1.0
