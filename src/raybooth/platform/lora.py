"""LoRA adapters in the format diffusers' `load_lora_weights` reads (what training exports and
what Serve and `raybooth generate --lora` load): peft adapters on the UNet attention projections
and, optionally, the text encoder's attention projections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_NAME = "raybooth_lora.json"


def add_lora(unet, text_encoder=None, rank: int = 4, alpha: float | None = None) -> None:
    """Attach fresh trainable LoRA adapters (the base weights stay frozen)."""
    from peft import LoraConfig

    alpha = alpha or rank
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    )
    if text_encoder is not None:
        # peft directly rather than transformers' `add_adapter`, which demands a newer peft than
        # the package index has; the layers and state-dict keys are the same.
        from peft import inject_adapter_in_model

        config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS
        )
        inject_adapter_in_model(config, text_encoder, adapter_name="default")
        text_encoder.peft_config = {"default": config}


def lora_state_dicts(unet, text_encoder=None) -> tuple[dict, dict | None]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    te_layers = None
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        te_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
    return unet_layers, te_layers


def save_lora_adapter(out_dir: str | Path, unet, text_encoder=None, metadata: dict[str, Any] | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (+ a metadata JSON naming the base model)."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet_layers, te_layers = lora_state_dicts(unet, text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers, safe_serialization=True
    )
    (out / METADATA_NAME).write_text(json.dumps(metadata or {}, indent=2, default=str))
    return out


def read_lora_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / METADATA_NAME
    return json.loads(path.read_text()) if path.is_file() else {}
