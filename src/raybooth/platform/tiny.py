"""The built-in tiny Stable Diffusion models (`tiny`, `tiny-inpainting`).

Random weights from a fixed seed, built from configs in code, saved once in diffusers layout
(safetensors) under `$RAYBOOTH_HOME/models/`, then loaded through the same `from_pretrained` path
as any real model. They have the real architecture in miniature (a UNet with cross-attention, a KL
VAE, a CLIP text encoder and a byte-level CLIP tokenizer), so every code path runs on a CPU in
seconds. Their images are noise-like: the weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raybooth.platform.paths import models_dir, publish_dir

TINY_NAMES = ("tiny", "tiny-inpainting")
# Bump when the architecture below changes: a different build gets a different folder.
TINY_BUILD = "v1"
TINY_RESOLUTION = 64
_SEED = 1234


def _byte_level_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # 256 byte symbols, each also as a word-final symbol, plus the two specials; no merges, so
    # every word is spelled out byte by byte. Enough for prompts to change the conditioning.
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _components(in_channels: int) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=TINY_RESOLUTION // 2,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    torch.manual_seed(_SEED + 1)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=TINY_RESOLUTION,
        norm_num_groups=32,
    )
    torch.manual_seed(_SEED + 2)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=eos,
            pad_token_id=eos,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    # The same noise schedule as Stable Diffusion v1.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


def tiny_model_path(name: str = "tiny") -> Path:
    """The tiny model's diffusers directory, built on first use (safe under concurrent builders)."""
    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {TINY_NAMES}")
    target = models_dir() / f"{name}-{TINY_BUILD}"
    if (target / "model_index.json").is_file():
        return target
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    inpainting = name == "tiny-inpainting"
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(
        **_components(9 if inpainting else 4),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Several Ray actors may build at once; a reader must never see a half-written model.
    with publish_dir(target) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "raybooth-tiny.json").write_text(
            json.dumps({"name": name, "build": TINY_BUILD, "seed": _SEED}, indent=2)
        )
    return target
