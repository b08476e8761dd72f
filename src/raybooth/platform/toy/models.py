"""The shipped toy models (`toy`, `toy-inpainting`) as diffusers folders.

The repository ships one set of weights (`raybooth/assets/toy/`, fp16 safetensors): a text
encoder and a VAE shared by both models, the text-to-image UNet and the inpainting UNet. On first
use each model is assembled into `$RAYBOOTH_HOME/models/<name>-<build>/` (fp32, with its tokenizer
built from code and its scheduler) and from then on loads through the same `from_pretrained` path
as any model, exactly like `tiny`.
"""

from __future__ import annotations

import json
from pathlib import Path

from raybooth.platform.generation import MODEL_DEFAULTS_FILE
from raybooth.platform.paths import models_dir, publish_dir
from raybooth.platform.quiet import quiet_libraries

TOY_NAMES = ("toy", "toy-inpainting")
ASSETS = Path(__file__).resolve().parent.parent.parent / "assets" / "toy"
BUILD_FILE = "build.json"  # the record of the build: command, seed, curves (beside the weights)
# Generation settings the toy models were measured with; the model folder carries them so a
# caller can prefer them over raybooth's global defaults (which suit Stable Diffusion).
RECOMMENDED = {"guidance_scale": 4.0, "steps": 25, "scheduler": "ddim"}
UNET_FOLDERS = {"toy": "unet", "toy-inpainting": "unet-inpainting"}


def toy_build() -> str:
    """The shipped build's id (changes whenever new weights are committed)."""
    record = ASSETS / BUILD_FILE
    if not record.is_file():
        return "missing"
    return str(json.loads(record.read_text())["build"])


def toy_weights_present() -> bool:
    return all((ASSETS / sub / "config.json").is_file()
               for sub in ("text_encoder", "vae", *UNET_FOLDERS.values()))


def toy_model_path(name: str = "toy") -> Path:
    """The toy model's diffusers directory, assembled on first use (safe under concurrent builders)."""
    from raybooth.platform.errors import ModelError

    if name not in TOY_NAMES:
        raise ValueError(f"unknown toy model {name!r}; expected one of {TOY_NAMES}")
    if not toy_weights_present():
        raise ModelError(
            f"the toy model weights are not in {ASSETS}; build them with `raybooth toy build`",
            field="model",
        )
    target = models_dir() / f"{name}-{toy_build()}"
    if (target / "model_index.json").is_file():
        return target
    # Several Ray actors may assemble at once; a reader must never see a half-written model.
    quiet_libraries()
    with publish_dir(target) as tmp:
        save_pipeline(ASSETS, name, tmp)
    return target


def save_pipeline(assets: Path, name: str, out: Path) -> None:
    """Assemble the diffusers pipeline `name` from the shared asset folders into `out`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    from raybooth.platform.toy.architecture import make_tokenizer, scheduler_config

    f32 = dict(torch_dtype=torch.float32)
    cls = StableDiffusionInpaintPipeline if name == "toy-inpainting" else StableDiffusionPipeline
    pipe = cls(
        vae=AutoencoderKL.from_pretrained(assets / "vae", **f32),
        text_encoder=CLIPTextModel.from_pretrained(assets / "text_encoder", dtype=torch.float32),
        tokenizer=make_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(assets / UNET_FOLDERS[name], **f32),
        scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    (out / MODEL_DEFAULTS_FILE).write_text(json.dumps(RECOMMENDED, indent=2))
    record = json.loads((assets / BUILD_FILE).read_text()) if (assets / BUILD_FILE).is_file() else {}
    (out / "raybooth-toy.json").write_text(json.dumps(
        {"name": name, "build": record.get("build"), "seed": record.get("seed"),
         "command": record.get("command")}, indent=2))
