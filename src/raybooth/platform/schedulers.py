"""Noise schedulers by name. Each call gets a fresh scheduler: they carry per-run state."""

from __future__ import annotations

from typing import Any

from raybooth.platform.errors import UserError

# name -> (diffusers class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


def check_scheduler(name: str, field: str = "scheduler") -> str:
    if name not in SCHEDULERS:
        raise UserError(
            f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}", field=field
        )
    return name


def make_scheduler(name: str, base_config: Any):
    """A scheduler of the named kind with the model's noise schedule (betas, prediction type)."""
    import diffusers

    check_scheduler(name)
    cls_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    return cls.from_config(base_config, **extra)
