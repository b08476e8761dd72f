"""The toy world's judge (raybooth.platform.toy) as two more metrics of the same report.

When the model is toy-based (the `toy` model, a folder assembled from it, or prompts from the
`toy` set), the pixel judge reads every generated image and the report gains:

- `toy_subject` (subject fidelity): the judge's split-subject score of each image, in [0, 1]: how
  much of the object is the subject's left colour on its left half and right colour on its right
  (raybooth.platform.toy.subject.subject_score). Its baseline is the same score on the real photos.
- `toy_prompt` (prompt fidelity): per image, the share of what the prompt asks that the judge reads:
  the background colour ("on a green background"), and for an object that is not the subject, its
  colour and shape ("a yellow square"). The subject is two-coloured, so its colour and shape are
  subject fidelity's business, not the prompt's.

No learned weights: exact on the toy world's own renders, tolerant of a model's noise.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

TOY_SUBJECT, TOY_PROMPT = "toy_subject", "toy_prompt"
TOY_MARKER = "raybooth-toy.json"  # written into a folder assembled from the toy weights


def is_toy_model(kind: str | None, path: str | Path | None, prompt_set: str | None, custom_prompts: bool) -> bool:
    if kind == "toy":
        return True
    if path is not None and (Path(path) / TOY_MARKER).is_file():
        return True
    return not custom_prompts and (prompt_set or "").strip().lower() == "toy"


def training_is_toy_based(model: str, prompt_set: str | None, custom_prompts: bool) -> bool:
    """The same question for a training config's `model` (a name or a folder) and its
    evaluation section: do evaluations of this run (live, and of its export) add the toy judge's
    scores? A run from a toy model is toy-based, whatever its export folder says."""
    from raybooth.platform.toy.models import TOY_NAMES

    folder = Path(model).expanduser()
    return is_toy_model("toy" if model.strip() in TOY_NAMES else None, folder if folder.is_dir() else None,
                        prompt_set, custom_prompts)


def requested(class_prompt: str) -> dict[str, str]:
    """What a toy prompt asks for: {'background': …, 'colour': …, 'shape': …} (those it names)."""
    from raybooth.platform.toy.world import COLOURS, SHAPES

    words = class_prompt.lower().replace(",", " ").split()
    out: dict[str, str] = {}
    for i, w in enumerate(words):
        if w in ("background", "backdrop") and i > 0 and words[i - 1] in COLOURS:
            out["background"] = words[i - 1]
        if w in SHAPES:
            out["shape"] = w
            if i > 0 and words[i - 1] in COLOURS:
                out["colour"] = words[i - 1]
    return out


def decode_rgb(pngs: list[bytes]) -> list[Any]:
    """PNG bytes (the evaluation job's generated and real images) as RGB PIL images."""
    from PIL import Image

    return [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]


def score_images(images: list[Any], prompts: list[str], class_prompts: list[str], identifier: str):
    """(subject scores, prompt scores, readings) per RGB image; prompt score NaN where the prompt
    asks nothing the judge can read."""
    from raybooth.platform.toy.judge import judge
    from raybooth.platform.toy.subject import subject_score

    subject, prompt, readings = [], [], []
    for image, p, cp in zip(images, prompts, class_prompts):
        image = image.convert("RGB")
        reading = judge(image)
        subject.append(subject_score(image))
        asked = requested(cp)
        if identifier in p.split():
            asked.pop("colour", None)
            asked.pop("shape", None)
        checks = [getattr(reading, key) == value for key, value in asked.items()]
        prompt.append(float(np.mean(checks)) if checks else float("nan"))
        readings.append(reading.to_json())
    return np.asarray(subject, dtype=np.float64), np.asarray(prompt, dtype=np.float64), readings


def real_subject_scores(images: list[Any]) -> np.ndarray:
    from raybooth.platform.toy.subject import subject_score

    return np.asarray([subject_score(im.convert("RGB")) for im in images], dtype=np.float64)
