"""The models DreamBooth trains and how: which parts learn (UNet, text encoder, or LoRA adapters
on their attention projections), which stay frozen (the VAE always), the optimizer and the
learning-rate schedule. Shared by the Ray Train loop, the export and the plain-loop benchmark,
so all three build exactly the same thing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from raybooth.platform.config import TrainConfig
from raybooth.platform.errors import ConfigError
from raybooth.platform.generation import (
    GENERATION_DEFAULTS,
    GenerationDefaults,
    defaults_for,
)
from raybooth.platform.lora import add_lora
from raybooth.platform.models import ResolvedModel, load_components
from raybooth.platform.quiet import quiet_libraries

MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainModels:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    # The modules with trainable parameters, by the name their weights are saved under.
    trainables: dict[str, Any] = field(default_factory=dict)
    # How the base model likes to be sampled (validation grids use it).
    generation_defaults: GenerationDefaults = GENERATION_DEFAULTS

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.trainables.values() for p in m.parameters() if p.requires_grad]


def load_train_models(config: TrainConfig, resolved: ResolvedModel, device: torch.device,
                      weight_dtype: torch.dtype = torch.float32) -> TrainModels:
    """Load the base model and make the parts that train trainable.

    Frozen parts (the VAE; the text encoder unless trained; the UNet's base weights in LoRA mode)
    are in eval mode without gradients. With mixed precision the frozen UNet and text encoder
    are stored in the half-precision dtype (they never get gradients); the VAE stays in fp32,
    since it runs only once per image when latents are cached and SD's VAE overflows in fp16.
    """
    from diffusers import DDPMScheduler

    t = config.train
    quiet_libraries(errors_only=True)
    comps = load_components(resolved)
    unet, vae, text_encoder = comps["unet"], comps["vae"], comps["text_encoder"]
    # Training uses the DDPM forward process with the base model's noise schedule.
    noise_scheduler = DDPMScheduler.from_config(comps["scheduler"].config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()

    trainables: dict[str, Any] = {}
    if t.mode == "full":
        unet.requires_grad_(True)
        trainables["unet"] = unet
        if t.train_text_encoder:
            text_encoder.requires_grad_(True)
            trainables["text_encoder"] = text_encoder
    else:
        # The same seed on every worker: identical adapters before DDP even broadcasts them.
        add_lora(unet, text_encoder if t.train_text_encoder else None, rank=t.lora_rank, alpha=t.lora_alpha)
        trainables["unet"] = unet
        if t.train_text_encoder:
            trainables["text_encoder"] = text_encoder

    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if t.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    for module in trainables.values():
        module.train()

    vae.to(device, dtype=torch.float32)
    if t.mode == "full":
        unet.to(device, dtype=torch.float32)
        text_encoder.to(device, dtype=torch.float32 if t.train_text_encoder else weight_dtype)
    else:
        # Base weights in the half dtype; the adapters (the only trainable params) in fp32.
        unet.to(device, dtype=weight_dtype)
        text_encoder.to(device, dtype=weight_dtype)
        for module in trainables.values():
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    return TrainModels(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=comps["tokenizer"],
        noise_scheduler=noise_scheduler, trainables=trainables,
        generation_defaults=defaults_for(resolved.path),
    )


# ---------------------------------------------------------------------------------------------
# Trainable weights (what checkpoints and the export carry)


def trainable_state(module) -> dict[str, torch.Tensor]:
    """The trainable parameters of a module by name (all of it in full mode, the adapters in LoRA)."""
    return {
        name: p.detach().to("cpu", copy=True).contiguous()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy saved trainable weights into a module built the same way; every one must match."""
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ConfigError(
            f"the checkpoint's {what} weights do not fit this configuration ({len(missing)} "
            f"missing, e.g. {missing[:2]}; {len(unknown)} unexpected, e.g. {unknown[:2]}); was it "
            "written with another train.mode, lora_rank or train_text_encoder?",
            field="run.resume_from",
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


# ---------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = config.train
    if t.use_8bit_adam:
        if not torch.cuda.is_available():
            raise ConfigError(
                "train.use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW runs on CUDA); "
                "set scaling.use_gpu=true on a GPU cluster, or train.use_8bit_adam=false",
                field="train.use_8bit_adam",
            )
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "train.use_8bit_adam needs bitsandbytes: pip install 'raybooth[gpu]' on the "
                "training nodes, or set train.use_8bit_adam=false",
                field="train.use_8bit_adam",
            ) from None
        return bnb.optim.AdamW8bit(params, lr=t.learning_rate, weight_decay=t.adam_weight_decay)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.adam_weight_decay,
                             fused=True if fused_adam_applies(params) else None)


def fused_adam_applies(params: list[torch.nn.Parameter]) -> bool:
    """torch's fused AdamW (one kernel for every tensor) where it runs: floating-point params on
    CPU or CUDA. torch's default on CPU is a Python loop over the tensors: on the tiny UNet (208
    tensors) 8.4 ms of a ~90 ms step against 3.4 ms fused (benchmarks/README.md, training)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def make_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """One scheduler step per optimizer step (not per process, not per micro-batch)."""
    from diffusers.optimization import get_scheduler

    t = config.train
    return get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
    )
