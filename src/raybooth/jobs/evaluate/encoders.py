"""The image and text encoders behind the paper's metrics, loaded by raybooth's model rules.

- DINO: `facebook/dino-vits16` (the paper's ViT-S/16 DINO); the embedding is the CLS token of the
  last layer (after its layer norm), as in the paper and DINO's own k-NN evaluation.
- CLIP: `openai/clip-vit-base-patch32` by default: the paper's CLIP-I/CLIP-T numbers were computed
  with ViT-B/32, so ours are comparable with its table (CLIP-T ~0.30, CLIP-I ~0.80); it is ~4x
  cheaper than ViT-L/14; and SD 1.x conditions on ViT-L/14's text tower, so judging prompt
  fidelity with that same text encoder would grade the model with its own reader. Any CLIP
  checkpoint (ViT-L/14 included) can be named in `evaluation.clip_encoder`.
- `tiny-dino`, `tiny-clip`: random tiny encoders (raybooth.platform.encoders_tiny) for tests.

References follow the model rules of raybooth.platform.models: a Hub id with revision, cache dir
and offline mode (`HF_HUB_OFFLINE` / `model_options.local_files_only`), a local folder, or a tiny
name; weights from safetensors only unless `model_options.allow_pickle`. Resolution runs on the
driver before Ray starts; actors load the resolved, revision-pinned folder.

Preprocessing reads the checkpoint's `preprocessor_config.json` and does what transformers' image
processors do (resize, centre crop, rescale, normalise) with PIL + numpy + torch: torchvision has
no wheel for this torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raybooth.platform.config import ModelOptions
from raybooth.platform.encoders_tiny import TINY_ENCODER_BUILD, TINY_ENCODER_NAMES, tiny_encoder_path
from raybooth.platform.errors import ModelError
from raybooth.platform.models import ALLOW_PICKLE_HINT, HUB_ID, PICKLE_SUFFIXES, hub_offline
from raybooth.platform.tiny import TINY_NAMES

DINO = "dino"
CLIP = "clip"
DEFAULT_ENCODERS = {DINO: "facebook/dino-vits16", CLIP: "openai/clip-vit-base-patch32"}
# transformers model_type values each role can use. CLIP needs the full model: CLIP-T reads text.
MODEL_TYPES = {DINO: ("vit", "dinov2"), CLIP: ("clip",)}
FIELDS = {DINO: "evaluation.dino_encoder", CLIP: "evaluation.clip_encoder"}
# What a Hub snapshot needs: configs, tokenizer files, weights.
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]

_DEFAULT_PREPROCESS = {
    DINO: {"size": {"height": 224, "width": 224}, "resample": 2,
           "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    CLIP: {"size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
           "crop_size": {"height": 224, "width": 224},
           "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711]},
}


@dataclass(frozen=True)
class ResolvedEncoder:
    """An encoder reference made concrete: a local transformers folder and where it came from."""

    ref: str
    role: str  # dino | clip
    kind: str  # tiny | local | hub
    path: str
    revision: str | None
    model_type: str
    allow_pickle: bool = False

    def describe(self) -> dict[str, Any]:
        return {"ref": self.ref, "kind": self.kind, "revision": self.revision, "model_type": self.model_type}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ResolvedEncoder":
        return cls(**data)


def _hub_folder(ref: str, revision: str | None, options: ModelOptions, field: str) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download

    offline = hub_offline(options)
    patterns = _HUB_PATTERNS + (["*.bin"] if options.allow_pickle else [])
    try:
        folder = Path(
            snapshot_download(
                ref, revision=revision, cache_dir=options.cache_dir, local_files_only=offline,
                allow_patterns=patterns,
            )
        )
    except Exception as exc:  # hub errors come in many classes; all mean "cannot resolve"
        text = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).rstrip(". ")
        where = f" in cache {options.cache_dir}" if options.cache_dir else ""
        if offline:
            advice = (
                f"offline mode is on (HF_HUB_OFFLINE / model_options.local_files_only) and the "
                f"encoder is not in the Hugging Face cache{where}; download it on a machine with "
                f"network access (`huggingface-cli download {ref}`) or point "
                "model_options.cache_dir at a cache that has it"
            )
        else:
            advice = "check the id, the revision, and your access to the Hub (HF_TOKEN)"
        raise ModelError(f"{field}: encoder {ref!r} could not be resolved: {text}. {advice}.", field=field) from None
    resolved_revision = folder.name if folder.parent.name == "snapshots" else revision
    return folder, resolved_revision


def _pipeline_not_encoder(ref: str, role: str, field: str) -> str:
    return (
        f"{field}: {ref!r} is a diffusion pipeline, not an image encoder; use a "
        f"{'DINO ViT' if role == DINO else 'CLIP'} checkpoint such as {DEFAULT_ENCODERS[role]!r} "
        f"(or 'tiny-{role}' for tests)"
    )


def _check_folder(ref: str, folder: Path, role: str, allow_pickle: bool, field: str) -> str:
    """The folder's model_type, after checking it holds an encoder this role can use."""
    if (folder / "model_index.json").is_file():
        raise ModelError(_pipeline_not_encoder(ref, role, field), field=field)
    config_file = folder / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    except (OSError, ValueError):
        raise ModelError(
            f"{field}: {ref!r} ({folder}) has no readable config.json: it is not a transformers model folder",
            field=field,
        ) from None
    if model_type not in MODEL_TYPES[role]:
        need = (
            "a ViT image encoder (model_type 'vit' or 'dinov2') such as 'facebook/dino-vits16'"
            if role == DINO
            else "a full CLIP model with image and text towers (model_type 'clip') such as "
            "'openai/clip-vit-base-patch32'"
        )
        raise ModelError(
            f"{field}: {ref!r} is a {model_type or 'model without a model_type'!r} model, not an image "
            f"encoder this metric can use; it needs {need}",
            field=field,
        )
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if not any(n.endswith(".safetensors") for n in files):
        pickles = [n for n in files if n.endswith(PICKLE_SUFFIXES)]
        if not (allow_pickle and pickles):
            what = f"only pickle weights ({pickles[0]})" if pickles else "no .safetensors weights"
            raise ModelError(f"{field}: encoder {ref!r} in {folder} has {what}. {ALLOW_PICKLE_HINT}", field=field)
    return model_type


def resolve_encoder(ref: str, role: str, options: ModelOptions | None = None, revision: str | None = None) -> ResolvedEncoder:
    """Resolve an encoder reference on the driver (no weights are read); errors name the field."""
    options = options or ModelOptions()
    field = FIELDS[role]
    ref = (ref or "").strip()
    if ref in TINY_NAMES:
        raise ModelError(_pipeline_not_encoder(ref, role, field), field=field)
    if ref in TINY_ENCODER_NAMES:
        if ref != f"tiny-{role}":
            raise ModelError(f"{field}: {ref!r} is the tiny encoder for the other metric; use 'tiny-{role}'", field=field)
        path = tiny_encoder_path(ref)
        kind, resolved_revision = "tiny", TINY_ENCODER_BUILD
    elif ref and Path(ref).expanduser().is_dir():
        path = Path(ref).expanduser().resolve()
        kind, resolved_revision = "local", None
    elif HUB_ID.match(ref):
        path, resolved_revision = _hub_folder(ref, revision or options.revision, options, field)
        kind = "hub"
    else:
        raise ModelError(
            f"{field}: {ref!r} is not an encoder reference raybooth understands: use a Hub id like "
            f"{DEFAULT_ENCODERS[role]!r}, a local transformers folder, or 'tiny-{role}'",
            field=field,
        )
    model_type = _check_folder(ref, path, role, options.allow_pickle, field)
    return ResolvedEncoder(
        ref=ref, role=role, kind=kind, path=str(path), revision=resolved_revision,
        model_type=model_type, allow_pickle=options.allow_pickle,
    )


# ---------------------------------------------------------------------------------------------
# Preprocessing (what transformers' image processors do, without torchvision)


def _side(size: Any) -> dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size}
    return dict(size)


@dataclass(frozen=True)
class Preprocess:
    size: dict[str, int]  # {"shortest_edge": n} or {"height": h, "width": w}
    resample: int
    crop: tuple[int, int] | None  # (height, width)
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    do_resize: bool = True

    @classmethod
    def from_folder(cls, folder: str | Path, role: str) -> "Preprocess":
        cfg = dict(_DEFAULT_PREPROCESS[role])
        file = Path(folder) / "preprocessor_config.json"
        if file.is_file():
            cfg.update(json.loads(file.read_text()))
        crop = _side(cfg["crop_size"]) if cfg.get("do_center_crop") and cfg.get("crop_size") else None
        return cls(
            size=_side(cfg["size"]),
            resample=int(cfg.get("resample", 2)),
            crop=(crop["height"], crop["width"]) if crop else None,
            rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None,
            mean=tuple(cfg["image_mean"]) if cfg.get("do_normalize", True) else None,
            std=tuple(cfg["image_std"]) if cfg.get("do_normalize", True) else None,
            do_resize=bool(cfg.get("do_resize", True)),
        )

    def _resized(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if "shortest_edge" in self.size:
            # As transformers' get_resize_output_image_size(default_to_square=False).
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_w, new_h = self.size["width"], self.size["height"]
        return image.resize((new_w, new_h), resample=Image.Resampling(self.resample))

    def __call__(self, images: list[Image.Image]):
        import torch

        arrays = []
        for image in images:
            image = image.convert("RGB")
            if self.do_resize:
                image = self._resized(image)
            if self.crop is not None:
                ch, cw = self.crop
                w, h = image.size
                if ch > h or cw > w:
                    raise ValueError(f"image {w}x{h} is smaller than the crop {cw}x{ch}")
                top, left = (h - ch) // 2, (w - cw) // 2
                image = image.crop((left, top, left + cw, top + ch))
            x = np.asarray(image).astype(np.float64)
            if self.rescale is not None:
                x = x * self.rescale
            x = x.astype(np.float32)
            if self.mean is not None:
                x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
            arrays.append(np.ascontiguousarray(x.transpose(2, 0, 1)))
        return torch.from_numpy(np.stack(arrays))


# ---------------------------------------------------------------------------------------------
# Loaded encoders


class ImageEncoder:
    """A loaded encoder: images (and, for CLIP, texts) to float32 embedding rows (not normalised)."""

    def __init__(self, resolved: ResolvedEncoder, device: str = "cpu"):
        import time

        t0 = time.perf_counter()
        self.resolved = resolved
        self.device = device
        self.preprocess = Preprocess.from_folder(resolved.path, resolved.role)
        try:
            self.model = self._load(use_safetensors=None if resolved.allow_pickle else True)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"{FIELDS[resolved.role]}: could not load encoder {resolved.ref!r} from {resolved.path}: {exc}",
                field=FIELDS[resolved.role],
            ) from None
        self.model.to(device).eval().requires_grad_(False)
        self.load_s = time.perf_counter() - t0

    def _load(self, use_safetensors: bool | None):
        raise NotImplementedError

    def _image_features(self, pixel_values):
        raise NotImplementedError

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = self.preprocess(images).to(self.device)
            return self._image_features(pixels).float().cpu().numpy()


class DinoEncoder(ImageEncoder):
    def _load(self, use_safetensors):
        if self.resolved.model_type == "vit":
            from transformers import ViTModel

            # The CLS token is the embedding; DINO checkpoints have no pooler to load.
            return ViTModel.from_pretrained(self.resolved.path, add_pooling_layer=False, use_safetensors=use_safetensors)
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.resolved.path, use_safetensors=use_safetensors)

    def _image_features(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class ClipEncoder(ImageEncoder):
    def _load(self, use_safetensors):
        from transformers import AutoTokenizer, CLIPModel

        self.tokenizer = AutoTokenizer.from_pretrained(self.resolved.path)
        return CLIPModel.from_pretrained(self.resolved.path, use_safetensors=use_safetensors)

    def _image_features(self, pixel_values):
        # The projected pooled output: CLIP's joint image-text space (get_image_features).
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        return self.model.visual_projection(pooled)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt",
        )
        with torch.inference_mode():
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            ).pooler_output
            return self.model.text_projection(pooled).float().cpu().numpy()


def load_encoder(resolved: ResolvedEncoder, device: str = "cpu") -> ImageEncoder:
    return (DinoEncoder if resolved.role == DINO else ClipEncoder)(resolved, device)
