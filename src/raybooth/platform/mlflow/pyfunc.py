"""A trained raybooth model as an MLflow `pyfunc` model (MLflow has no diffusers flavour).

What the logged model holds (`artifacts/` of the MLflow model directory; names in
raybooth.platform.mlflow.refs):
- full mode: `pipeline` — the exported diffusers pipeline directory;
- LoRA mode: `lora` — the adapter directory (the LoRA weights file + raybooth_lora.json); the
  base model is a reference (`tiny`, a Hub id + revision, `models:/...`) resolved when loaded;
- `raybooth` — raybooth_model.json (`ModelInfo`): mode, base model, default steps/guidance, subject.

`mlflow.pyfunc.load_model(uri).predict(pandas.DataFrame({"prompt": [...], "seed": [...]}))` returns a
DataFrame with one base64-encoded PNG per row (`image`) and the seed used, so `mlflow models serve`
answers `{"dataframe_records": [{"prompt": "...", "seed": 1}]}` too. Optional columns:
`negative_prompt`, `steps`, `guidance_scale`.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from raybooth.platform.generation import GENERATION_DEFAULTS, group_indices
from raybooth.platform.mlflow.refs import (
    ARTIFACT_INFO,
    ARTIFACT_LORA,
    ARTIFACT_PIPELINE,
    read_model_info,
)

# Input columns and their MLflow types; only prompt and seed are required.
INPUT_COLUMNS = {
    "prompt": ("string", True),
    "seed": ("long", True),
    "negative_prompt": ("string", False),
    "steps": ("long", False),
    "guidance_scale": ("double", False),
}
MAX_ROWS = 64  # one predict call is one batch of images; bigger requests are split by the caller
MAX_STEPS = 200


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec(t, name, required=req) for name, (t, req) in INPUT_COLUMNS.items()])
    outputs = Schema([ColSpec("string", "image"), ColSpec("long", "seed")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example():
    import pandas as pd

    return pd.DataFrame({"prompt": ["a photo of sks toy on a beach"], "seed": [0]})


def encode_png(image) -> str:
    from raybooth.platform.images import png_bytes

    return base64.b64encode(png_bytes(image)).decode("ascii")


def decode_png(data: str):
    """The inverse of the `image` column: a base64 PNG string back into a PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def _present(value: Any) -> bool:
    """A value in an optional column (pandas fills absent ones with NaN/None)."""
    if value is None:
        return False
    try:
        return not (isinstance(value, float) and math.isnan(value))
    except TypeError:
        return True


@dataclass(frozen=True)
class _Row:
    prompt: str
    seed: int
    negative_prompt: str
    steps: int
    guidance_scale: float


class RayboothDiffusionModel(mlflow.pyfunc.PythonModel):
    """Text-to-image with a DreamBooth model trained by raybooth (full pipeline or LoRA)."""

    def load_context(self, context) -> None:
        from dataclasses import replace

        from raybooth.platform.config import ModelOptions
        from raybooth.platform.models import resolve_model
        from raybooth.platform.pipelines import DiffusionRunner

        self.info = read_model_info(Path(context.artifacts[ARTIFACT_INFO]))
        if self.info.mode == "lora":
            base = resolve_model(self.info.base_model, ModelOptions(revision=self.info.base_revision))
            resolved = replace(base, lora_path=Path(context.artifacts[ARTIFACT_LORA]))
        else:
            resolved = resolve_model(str(context.artifacts[ARTIFACT_PIPELINE]))
        self.runner = DiffusionRunner(resolved)

    def _rows(self, frame) -> list[_Row]:
        from raybooth.platform.errors import UserError

        if "prompt" not in frame or "seed" not in frame:
            raise UserError("each row needs a 'prompt' and a 'seed' column", field="prompt")
        if len(frame) > MAX_ROWS:
            raise UserError(f"at most {MAX_ROWS} rows per call (got {len(frame)})", field="prompt")
        default_steps = self.info.default_steps or GENERATION_DEFAULTS.steps
        default_guidance = (
            GENERATION_DEFAULTS.guidance_scale
            if self.info.default_guidance_scale is None else self.info.default_guidance_scale
        )
        rows = []
        for i, row in enumerate(frame.to_dict("records")):
            steps = int(row["steps"]) if _present(row.get("steps")) else int(default_steps)
            if not 1 <= steps <= MAX_STEPS:
                raise UserError(f"row {i}: steps must be in 1..{MAX_STEPS} (got {steps})", field="steps")
            rows.append(_Row(
                prompt=str(row["prompt"]),
                seed=int(row["seed"]),
                negative_prompt=str(row["negative_prompt"]) if _present(row.get("negative_prompt")) else "",
                steps=steps,
                guidance_scale=(
                    float(row["guidance_scale"]) if _present(row.get("guidance_scale")) else float(default_guidance)
                ),
            ))
        return rows

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from raybooth.platform.generation import GenerationParams

        rows = self._rows(pd.DataFrame(model_input))
        lora = next(iter(self.runner.adapters), None)
        images: list[str | None] = [None] * len(rows)
        # One pipeline call per set of rows that can share one (equal steps and guidance).
        gens = [GenerationParams(steps=r.steps, guidance_scale=r.guidance_scale, lora=lora) for r in rows]
        for group in group_indices(g.key() for g in gens):
            negatives = [rows[i].negative_prompt for i in group]
            out = self.runner.text_to_image(
                [rows[i].prompt for i in group], [rows[i].seed for i in group], gens[group[0]],
                negatives if any(negatives) else None,
            )
            for i, img in zip(group, out):
                images[i] = encode_png(img)
        return pd.DataFrame({"image": images, "seed": [r.seed for r in rows]})


def pip_requirements() -> list[str]:
    """What `mlflow models serve` installs when it builds an environment (the raybooth package
    itself travels with the model as code)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors",
                 "pillow", "pandas", "numpy", "pydantic", "pyyaml", "huggingface_hub", "mlflow"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def package_code_path() -> str:
    """The raybooth package directory, logged with the model so it loads without raybooth
    installed (e.g. in the environment `mlflow models serve` builds)."""
    import raybooth

    return str(Path(raybooth.__file__).resolve().parent)
