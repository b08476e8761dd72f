"""Export a trained checkpoint as something `raybooth generate`, Serve and MLflow load:

- full mode: a complete diffusers pipeline directory `<run_dir>/model` (the base model's VAE,
  tokenizer and scheduler with the trained UNet and text encoder), safetensors only;
- LoRA mode: the adapter `<run_dir>/lora` (the weights file raybooth.platform.lora names, in the
  format diffusers' `load_lora_weights` reads, plus `raybooth_lora.json` naming the base model).

Both are written beside the target and renamed into place, so a reader never sees half an export.
What the driver gets back is an `Export` (raybooth.jobs.train.handoff).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raybooth.jobs.train.checkpoints import load_checkpoint
from raybooth.jobs.train.handoff import Export
from raybooth.jobs.train.model import load_trainable_state
from raybooth.platform.config import TrainConfig
from raybooth.platform.lora import add_lora, save_lora_adapter
from raybooth.platform.models import ResolvedModel, load_components
from raybooth.platform.paths import publish_dir
from raybooth.platform.quiet import quiet_libraries

MODEL_DIR = "model"
LORA_DIR = "lora"
EXPORT_RECORD = "raybooth_export.json"


def export_checkpoint(config: TrainConfig, resolved: ResolvedModel, checkpoint_dir: str | Path,
                      run_dir: str | Path) -> Export:
    """Write the export of `checkpoint_dir` into `run_dir` and say what it is."""
    t = config.train
    run_dir = Path(run_dir)
    state = load_checkpoint(checkpoint_dir)
    quiet_libraries(errors_only=True)
    comps = load_components(resolved, dtype=torch.float32)
    unet, text_encoder = comps["unet"], comps["text_encoder"]
    record = {
        "base_model": config.model,
        "base_revision": resolved.revision,
        "mode": t.mode,
        "step": state.step,
        "checkpoint": str(Path(checkpoint_dir)),
        "instance_prompt": config.subject.instance_prompt,
        "identifier": config.subject.identifier,
    }
    target = run_dir / (MODEL_DIR if t.mode == "full" else LORA_DIR)
    with publish_dir(target, replace=True) as tmp:
        if t.mode == "full":
            unet.requires_grad_(True)  # load_trainable_state copies what is trainable: all of it
            load_trainable_state(unet, state.weights["unet"], "unet")
            if "text_encoder" in state.weights:
                text_encoder.requires_grad_(True)
                load_trainable_state(text_encoder, state.weights["text_encoder"], "text_encoder")
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline(
                **comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2))

        else:
            for module in (unet, text_encoder):
                module.requires_grad_(False)
            add_lora(unet, text_encoder if t.train_text_encoder else None, rank=t.lora_rank, alpha=t.lora_alpha)
            load_trainable_state(unet, state.weights["unet"], "unet")
            if t.train_text_encoder:
                load_trainable_state(text_encoder, state.weights["text_encoder"], "text_encoder")
            save_lora_adapter(
                tmp, unet, text_encoder if t.train_text_encoder else None,
                metadata={**record, "lora_rank": t.lora_rank, "lora_alpha": t.lora_alpha or t.lora_rank},
            )
    return Export(mode=t.mode, path=target, step=state.step, base_model=config.model,
                  base_revision=resolved.revision)
