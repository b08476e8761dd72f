"""The built-in tiny image encoders for evaluation (`tiny-dino`, `tiny-clip`).

Like the tiny Stable Diffusion model (raybooth.platform.tiny): random weights from a fixed seed,
built from configs in code, saved once in transformers layout (safetensors, config.json,
preprocessor_config.json and, for CLIP, the byte-level tokenizer) under `$RAYBOOTH_HOME/models/`,
then loaded through the same `from_pretrained` path as `facebook/dino-vits16` and
`openai/clip-vit-base-patch32`. Their numbers mean nothing about image quality; they let every
code path of the evaluation run on a CPU in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raybooth.platform.paths import models_dir, publish_dir

TINY_ENCODER_NAMES = ("tiny-dino", "tiny-clip")
# Bump when an architecture below changes: a different build gets a different folder.
TINY_ENCODER_BUILD = "v1"
TINY_ENCODER_RESOLUTION = 32
_SEED = 4321

# The preprocessing files the real checkpoints carry, in miniature (same keys, same meaning).
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _preprocessor(kind: str) -> dict:
    r = TINY_ENCODER_RESOLUTION
    if kind == "dino":
        return {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": r, "width": r},
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": _IMAGENET_MEAN,
            "image_std": _IMAGENET_STD,
        }
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": r},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": r, "width": r},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
        "do_convert_rgb": True,
    }


def _save_dino(folder: Path) -> None:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(_SEED)
    # ViT-S/16's shape in miniature: the CLS token of the last layer is the embedding.
    model = ViTModel(
        ViTConfig(
            image_size=TINY_ENCODER_RESOLUTION,
            patch_size=8,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
        ),
        add_pooling_layer=False,
    )
    model.save_pretrained(folder, safe_serialization=True)


def _save_clip(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    from raybooth.platform.tiny import _byte_level_tokenizer

    tokenizer = _byte_level_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(_SEED + 1)
    model = CLIPModel(
        CLIPConfig(
            text_config=dict(
                bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
                eos_token_id=eos,
                pad_token_id=eos,
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
            ),
            vision_config=dict(
                image_size=TINY_ENCODER_RESOLUTION,
                patch_size=8,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
            projection_dim=16,
        )
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def tiny_encoder_path(name: str) -> Path:
    """The tiny encoder's transformers directory, built on first use (safe under concurrent builders)."""
    if name not in TINY_ENCODER_NAMES:
        raise ValueError(f"unknown tiny encoder {name!r}; expected one of {TINY_ENCODER_NAMES}")
    target = models_dir() / f"{name}-{TINY_ENCODER_BUILD}"
    if (target / "config.json").is_file():
        return target
    kind = name.removeprefix("tiny-")
    from transformers.utils import logging as transformers_logging

    # No "Writing model shards" bar in the middle of a command's output (restored afterwards).
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    # Several Ray actors may build at once; a reader must never see a half-written model.
    try:
        with publish_dir(target) as tmp:
            (_save_dino if kind == "dino" else _save_clip)(tmp)
            (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessor(kind), indent=2))
            (tmp / "raybooth-tiny.json").write_text(
                json.dumps({"name": name, "build": TINY_ENCODER_BUILD, "seed": _SEED}, indent=2)
            )
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    return target
