"""Text-to-image and inpainting runners shared by the CLI, training validation, prior generation
and Serve.

One `DiffusionRunner` holds one loaded model (on one device) and answers batched calls. A call
takes one prompt and one seed per image and makes a generator per image, so an image depends on
its own prompt, seed and the call's shared parameters — not on what else was in the batch. The
shared parameters (size, steps, guidance, scheduler, strength, LoRA) are what a caller groups
requests by before calling.

Not thread-safe: one call at a time per runner (Serve runs one batch at a time per replica).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from raybooth.platform.config import ModelOptions
from raybooth.platform.devices import pick_device, pick_dtype
from raybooth.platform.errors import UserError
from raybooth.platform.generation import GenerationParams, InpaintParams
from raybooth.platform.lora import WEIGHTS_NAME
from raybooth.platform.masks import blur_mask, composite, crop_box
from raybooth.platform.models import ResolvedModel, load_components, resolve_model
from raybooth.platform.schedulers import make_scheduler

MAX_SEED = 2**63 - 1


def _generators(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same starting noise on any device.
    return [torch.Generator(device="cpu").manual_seed(int(s) % MAX_SEED) for s in seeds]


class DiffusionRunner:
    """A loaded model answering text-to-image and inpainting calls."""

    def __init__(
        self,
        model: str | ResolvedModel = "tiny",
        *,
        options: ModelOptions | None = None,
        device: str = "auto",
        dtype: str = "auto",
        channels_last: bool = False,
        compile_unet: bool = False,
    ):
        from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

        t0 = time.perf_counter()
        self.resolved = model if isinstance(model, ResolvedModel) else resolve_model(model, options)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        comps = load_components(self.resolved, dtype=self.dtype)
        for module in (comps["unet"], comps["vae"], comps["text_encoder"]):
            module.to(self.device)
            module.eval()
            module.requires_grad_(False)
        if channels_last:
            comps["unet"].to(memory_format=torch.channels_last)
            comps["vae"].to(memory_format=torch.channels_last)
        if compile_unet:
            comps["unet"] = torch.compile(comps["unet"])
        self.components = comps
        self.base_scheduler_config = comps["scheduler"].config
        unet_cfg = comps["unet"].config
        self.is_inpainting_model = unet_cfg.in_channels == 9
        extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        # Both pipelines share the same modules: a LoRA loaded through one applies to both.
        self._t2i = StableDiffusionPipeline(**comps, **extra)
        self._inpaint = StableDiffusionInpaintPipeline(**comps, **extra)
        for pipe in (self._t2i, self._inpaint):
            pipe.set_progress_bar_config(disable=True)
        self.vae_scale_factor = self._t2i.vae_scale_factor
        self.default_size = int(unet_cfg.sample_size) * self.vae_scale_factor
        self.adapters: dict[str, str] = {}
        self.load_s = time.perf_counter() - t0
        if self.resolved.lora_path is not None:
            self.load_lora(self.resolved.lora_path, name="default")

    # ------------------------------------------------------------------ LoRA adapters

    def load_lora(self, path: str | Path, name: str | None = None) -> str:
        """Load a DreamBooth LoRA adapter (a folder with the adapter's weights file)."""
        path = Path(path)
        weights = path / WEIGHTS_NAME if path.is_dir() else path
        if not weights.is_file():
            raise UserError(
                f"LoRA adapter {path}: no {WEIGHTS_NAME} there (a LoRA export "
                "of `raybooth train` with train.mode=lora)",
                field="lora",
            )
        name = name or path.stem.replace(".", "_")
        if name in self.adapters:
            return name
        try:
            self._t2i.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"LoRA adapter {path} does not fit model {self.resolved.ref!r}: {exc}", field="lora") from None
        self.adapters[name] = str(path)
        return name

    def unload_lora(self, name: str) -> None:
        if self.adapters.pop(name, None) is not None:
            self._t2i.delete_adapters([name])

    def _activate(self, lora: str | None) -> None:
        if not self.adapters:
            if lora is not None:
                raise UserError(f"LoRA adapter {lora!r} is not loaded", field="lora")
            return
        if lora is None:
            self._t2i.disable_lora()
            return
        if lora not in self.adapters:
            raise UserError(f"LoRA adapter {lora!r} is not loaded", field="lora")
        self._t2i.enable_lora()
        self._t2i.set_adapters([lora])

    # ------------------------------------------------------------------ calls

    def _size(self, params: GenerationParams) -> tuple[int, int]:
        return params.height or self.default_size, params.width or self.default_size

    def text_to_image(
        self,
        prompts: list[str],
        seeds: list[int],
        params: GenerationParams | None = None,
        negative_prompts: list[str] | None = None,
    ) -> list[Image.Image]:
        """One image per (prompt, seed)."""
        params = params or GenerationParams()
        params.check()
        if self.is_inpainting_model:
            raise UserError(
                f"model {self.resolved.ref!r} is an inpainting model (9-channel UNet); use it for "
                "inpainting, or pick a text-to-image model",
                field="model",
            )
        _check_lengths(prompts, seeds, negative_prompts)
        height, width = self._size(params)
        pipe = self._t2i
        pipe.scheduler = make_scheduler(params.scheduler, self.base_scheduler_config)
        self._activate(params.lora)
        with torch.inference_mode():
            out = pipe(
                prompt=list(prompts),
                negative_prompt=list(negative_prompts) if negative_prompts else None,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance_scale,
                height=height,
                width=width,
                generator=_generators(seeds),
                output_type="pil",
            )
        return list(out.images)

    def inpaint(
        self,
        images: list[Image.Image],
        masks: list[Image.Image],
        prompts: list[str],
        seeds: list[int],
        params: InpaintParams | None = None,
        negative_prompts: list[str] | None = None,
    ) -> list[Image.Image]:
        """Repaint the white area of each mask. Pixels where the (blurred) mask is zero come back
        byte-identical; works with 9-channel inpainting UNets and with 4-channel models (latent
        blending), so a DreamBooth model can inpaint its subject."""
        params = params or InpaintParams()
        params.check()
        _check_lengths(prompts, seeds, negative_prompts)
        if not (len(images) == len(masks) == len(prompts)):
            raise UserError("one image and one mask per prompt are needed", field="image")
        for i, (img, mask) in enumerate(zip(images, masks)):
            if img.size != mask.size:
                raise UserError(
                    f"mask {i} is {mask.size[0]}x{mask.size[1]} but image {i} is "
                    f"{img.size[0]}x{img.size[1]}",
                    field="mask",
                )
        soft_masks = [blur_mask(m.convert("L"), params.mask_blur) for m in masks]
        crops, gen_inputs, gen_masks, todo = [], [], [], []
        for i, (img, mask) in enumerate(zip(images, soft_masks)):
            if params.crop_margin is not None:
                height, width = self._size(params)
                box = crop_box(mask, params.crop_margin, width / height)
            else:
                # Whole image at its own size (rounded to what the VAE needs).
                box = (0, 0, img.size[0], img.size[1]) if mask.getbbox() else None
                width, height = params.generation_size(img.size)
            crops.append(box)
            if box is None:
                continue  # an empty mask repaints nothing
            todo.append(i)
            gen_inputs.append(img.crop(box).resize((width, height), Image.LANCZOS))
            gen_masks.append(mask.crop(box).resize((width, height), Image.LANCZOS))
        results = [img.copy() for img in images]
        if not todo:
            return results
        sizes = {im.size for im in gen_inputs}
        if len(sizes) > 1:
            raise UserError(
                "images of different sizes in one inpainting call: give height and width, or "
                "call once per size",
                field="image",
            )
        width, height = gen_inputs[0].size
        pipe = self._inpaint
        pipe.scheduler = make_scheduler(params.scheduler, self.base_scheduler_config)
        self._activate(params.lora)
        negs = [negative_prompts[i] for i in todo] if negative_prompts else None
        with torch.inference_mode():
            out = pipe(
                prompt=[prompts[i] for i in todo],
                negative_prompt=negs,
                image=gen_inputs,
                mask_image=gen_masks,
                strength=params.strength,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance_scale,
                height=height,
                width=width,
                generator=_generators([seeds[i] for i in todo]),
                output_type="pil",
            )
        for i, generated in zip(todo, out.images):
            box = crops[i]
            region = generated.resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS)
            original_region = images[i].convert("RGB").crop(box)
            mask_region = soft_masks[i].crop(box)
            results[i].paste(composite(original_region, region, mask_region), box[:2])
        return results

    def describe(self) -> dict[str, Any]:
        return {
            **self.resolved.describe(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "inpainting_model": self.is_inpainting_model,
        }


def _check_lengths(prompts: list[str], seeds: list[int], negatives: list[str] | None) -> None:
    if not prompts:
        raise UserError("at least one prompt is needed", field="prompt")
    if len(seeds) != len(prompts):
        raise UserError("one seed per prompt is needed", field="seed")
    if negatives is not None and len(negatives) != len(prompts):
        raise UserError("one negative prompt per prompt is needed", field="negative_prompt")
