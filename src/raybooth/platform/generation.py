"""What one generation call is made of, without importing torch: the defaults every entry point
shares (CLI, Serve, the MLflow pyfunc model, training validation, class images), the parameters
that must be equal for images to share one pipeline call, and how requests are grouped by them.

Kept free of torch and diffusers so that `raybooth generate --help` and the Serve ingress can
read the defaults and validate a request without loading the ML stack.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable
from dataclasses import astuple, dataclass, fields, replace
from pathlib import Path

from raybooth.platform.errors import UserError
from raybooth.platform.schedulers import check_scheduler

# Image sides must be multiples of this: the VAE halves the size per block (8 for SD 1.x).
SIDE_MULTIPLE = 8


@dataclass(frozen=True)
class GenerationDefaults:
    """What a caller gets for a field it leaves out."""

    steps: int = 20
    guidance_scale: float = 7.5
    scheduler: str = "ddim"


GENERATION_DEFAULTS = GenerationDefaults()

# A model folder may carry the settings it was made for (the toy models want guidance 4 and 25
# steps, not Stable Diffusion's 7.5 / 20): `{"steps": …, "guidance_scale": …, "scheduler": …}`.
MODEL_DEFAULTS_FILE = "raybooth-defaults.json"


def defaults_for(model_dir: str | Path | None) -> GenerationDefaults:
    """The model's own recommended settings where its folder has them, else the global ones."""
    if model_dir is None:
        return GENERATION_DEFAULTS
    path = Path(model_dir) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return GENERATION_DEFAULTS
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(GenerationDefaults)}
        return replace(GENERATION_DEFAULTS, **{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError):
        return GENERATION_DEFAULTS  # a damaged hint is not worth failing a generation for


@dataclass
class GenerationParams:
    """What must be equal for images to share one pipeline call."""

    steps: int = GENERATION_DEFAULTS.steps
    guidance_scale: float = GENERATION_DEFAULTS.guidance_scale
    scheduler: str = GENERATION_DEFAULTS.scheduler
    height: int | None = None
    width: int | None = None
    lora: str | None = None  # an adapter name loaded with DiffusionRunner.load_lora

    def check(self) -> None:
        if self.steps < 1:
            raise UserError(f"steps must be at least 1 (got {self.steps})", field="steps")
        if self.guidance_scale < 0:
            raise UserError("guidance_scale must be >= 0", field="guidance_scale")
        check_scheduler(self.scheduler)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < SIDE_MULTIPLE or value % SIDE_MULTIPLE):
                raise UserError(
                    f"{name} must be a positive multiple of {SIDE_MULTIPLE} (got {value})", field=name
                )

    def key(self) -> tuple:
        """Hashable: two calls with equal keys can run as one pipeline call."""
        return (type(self).__name__, *(float(v) if isinstance(v, float) else v for v in astuple(self)))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class InpaintParams(GenerationParams):
    strength: float = 1.0
    mask_blur: float = 0.0
    crop_margin: int | None = None  # None: whole image; else crop to the mask with this margin

    def check(self) -> None:
        super().check()
        if not 0.0 < self.strength <= 1.0:
            raise UserError(f"strength must be in (0, 1] (got {self.strength})", field="strength")
        if self.mask_blur < 0:
            raise UserError("mask_blur must be >= 0", field="mask_blur")
        if self.crop_margin is not None and self.crop_margin < 0:
            raise UserError("crop_margin must be >= 0", field="crop_margin")

    def generation_size(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """(width, height) the model runs at for an image of `image_size` when the whole image
        is repainted (no crop): the given sides, else the image's own rounded down to the multiple
        the VAE needs. None with a crop margin: then the model's native size applies."""
        if self.crop_margin is not None:
            return None
        w, h = image_size
        return (
            self.width or max(SIDE_MULTIPLE, w // SIDE_MULTIPLE * SIDE_MULTIPLE),
            self.height or max(SIDE_MULTIPLE, h // SIDE_MULTIPLE * SIDE_MULTIPLE),
        )


def group_indices(keys: Iterable[Hashable]) -> list[list[int]]:
    """Indices grouped by equal key, groups in order of their first member (first come, first
    run). What turns a batch of requests into as few pipeline calls as possible."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())
