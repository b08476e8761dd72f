"""Sample LoRA subjects for the tiny model: what the demo, the benchmarks and the tests serve when
no trained subject is at hand.

A real subject comes from `raybooth train` (train.mode=lora). A sample one is the same kind of
file: LoRA adapters on the tiny model's attention projections, written with the same
`save_lora_adapter`, with random weights from a fixed seed so that every sample subject draws
visibly different images from the base model and from the others.
"""

from __future__ import annotations

from pathlib import Path

from raybooth.platform.lora import METADATA_NAME, WEIGHTS_NAME


def make_sample_subject(out_dir: str | Path, seed: int, base_model: str = "tiny", scale: float = 0.2) -> Path:
    """Write a LoRA adapter for `base_model` (a tiny model) into `out_dir`; return the folder."""
    import torch

    from raybooth.platform.lora import add_lora, save_lora_adapter
    from raybooth.platform.models import load_components, resolve_model

    out = Path(out_dir)
    if (out / WEIGHTS_NAME).is_file() and (out / METADATA_NAME).is_file():
        return out
    comps = load_components(resolve_model(base_model))
    unet, text_encoder = comps["unet"], comps["text_encoder"]
    add_lora(unet, text_encoder, rank=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in [*unet.named_parameters(), *text_encoder.named_parameters()]:
            if "lora_B" in name:
                # lora_B starts at zero (an adapter that changes nothing): give it weights. Only
                # B: a random lora_A on top of its own init makes activations so large that
                # float rounding shows in the image.
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return save_lora_adapter(out, unet, text_encoder, metadata={"base_model": base_model, "sample_seed": seed})
