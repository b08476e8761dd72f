"""Device and dtype choice: CUDA with half precision when present, else CPU with fp32."""

from __future__ import annotations

import torch

from raybooth.platform.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {preference!r} was asked for but no CUDA GPU is visible", field="device")
    return torch.device(preference)


def pick_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    if preference == "auto":
        # fp16 is what SD 1.x checkpoints ship for inference; CPUs are fastest and exact in fp32.
        return torch.float16 if device.type == "cuda" else torch.float32
    if preference not in DTYPES:
        raise UserError(f"dtype {preference!r}: expected one of auto, {', '.join(DTYPES)}", field="dtype")
    return DTYPES[preference]
