"""GPU training benchmark: seconds per step and peak GPU memory of the DreamBooth step on a model
with Stable Diffusion 1.5's architecture, at 512×512 in bf16, for full fine-tuning (UNet + text
encoder) and LoRA (UNet + text encoder adapters, rank 16), each with gradient checkpointing and
8-bit AdamW on and off.

    python benchmarks/gpu/bench_train_gpu.py [--steps 10] [--warmup 3] [--out DIR]

No download: the UNet, VAE and CLIP text encoder are built with random weights from SD1.5's
published configuration (the same layer sizes, so the same compute and memory) and saved once in
diffusers layout; the tokenizer is raybooth's byte-level one (it changes nothing that is measured).
Each variant runs in its own process (clean peak-memory statistics) through the same code the Ray
Train worker runs (raybooth.jobs.train.model / train_data / train_loss with Accelerate's bf16),
but without Ray: the GPU machines of this project's device sessions have no Ray (see README.md).
Batch: 1 instance + 1 class image (prior preservation), latents and frozen embeddings cached.

Targets (issue 4): full + text encoder with 8-bit Adam and gradient checkpointing <= 16 GB peak;
LoRA <= 8 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

# (name, mode, gradient checkpointing, 8-bit Adam)
VARIANTS = [
    ("full+te", "full", False, False),
    ("full+te gc", "full", True, False),
    ("full+te 8bit", "full", False, True),
    ("full+te gc 8bit", "full", True, True),
    ("lora", "lora", False, False),
    ("lora gc", "lora", True, False),
    ("lora 8bit", "lora", False, True),
    ("lora gc 8bit", "lora", True, True),
]


def build_sd15_random(target: Path) -> Path:
    """A diffusers pipeline directory with SD1.5's architecture and random weights."""
    if (target / "model_index.json").is_file():
        return target
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from raybooth.platform.tiny import _byte_level_tokenizer

    torch.manual_seed(0)
    tokenizer = _byte_level_tokenizer()
    unet = UNet2DConditionModel(  # stable-diffusion-v1-5 unet/config.json
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
    )
    vae = AutoencoderKL(  # vae/config.json
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    bos, eos = tokenizer.convert_tokens_to_ids("<|startoftext|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(  # text_encoder/config.json (CLIP ViT-L/14 text tower)
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=768, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def make_images(folder: Path, n: int, seed: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        if not path.is_file():
            Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def run_variant(name: str, model_dir: Path, work: Path, steps: int, warmup: int, resolution: int = 512) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from raybooth.jobs.train.data import (CLASS_STREAM, INSTANCE_STREAM, ImageLatents, PromptEmbeddings,
                                          Stream, build_schedule, derive_seed, load_images)
    from raybooth.jobs.train.loss import dreambooth_loss, noisy_batch
    from raybooth.jobs.train.model import MIXED_PRECISION_DTYPES, load_train_models, make_optimizer
    from raybooth.platform.config import TrainConfig, with_overrides
    from raybooth.platform.models import resolve_model

    _, mode, gc, eight_bit = next(v for v in VARIANTS if v[0] == name)
    config = with_overrides(TrainConfig(), {
        "model": str(model_dir), "train.mode": mode, "train.lora_rank": 16, "train.train_text_encoder": True,
        "train.resolution": resolution, "train.mixed_precision": "bf16", "train.gradient_checkpointing": gc,
        "train.use_8bit_adam": eight_bit, "train.learning_rate": 5e-6 if mode == "full" else 1e-4,
        "scaling.use_gpu": True,
    })
    t = config.train
    accelerator = Accelerator(mixed_precision="bf16")
    device = accelerator.device
    set_seed(0)
    models = load_train_models(config, resolve_model(config.model), device, MIXED_PRECISION_DTYPES["bf16"])
    total = warmup + steps
    instance = ImageLatents(load_images(make_images(work / "instance", 5, 1), resolution, "instance"), resolution,
                            True, models.vae, device, cached=True)
    classes = ImageLatents(load_images(make_images(work / "class", 8, 2), resolution, "class"), resolution,
                           True, models.vae, device, cached=True)
    order_i = build_schedule(Stream(0, INSTANCE_STREAM, 5), total, 0, 1, 1, False, device)
    order_c = build_schedule(Stream(0, CLASS_STREAM, 8), total, 0, 1, 1, False, device)
    prompts = PromptEmbeddings(models.tokenizer, models.text_encoder, ["a photo of sks dog", "a photo of a dog"],
                               device, frozen="text_encoder" not in models.trainables)
    which = torch.tensor([0, 1], device=device)
    params = models.trainable_parameters()
    optimizer = make_optimizer(config, params)
    names = list(models.trainables)
    *wrapped, optimizer = accelerator.prepare(*models.trainables.values(), optimizer)
    wrapped = dict(zip(names, wrapped))
    unet, text_encoder = wrapped["unet"], wrapped.get("text_encoder", models.text_encoder)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(total):
        t0 = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(derive_seed(0, 21, 0, step))
        latents = torch.cat([instance.latents(order_i, step, generator), classes.latents(order_c, step, generator)])
        noisy = noisy_batch(latents, models.noise_scheduler, generator)
        with accelerator.autocast():
            hidden = prompts.hidden_states(which, text_encoder)
            pred = unet(noisy.noisy, noisy.timesteps, hidden, return_dict=False)[0]
        parts = dreambooth_loss(pred, noisy, models.noise_scheduler, with_prior=True, prior_loss_weight=1.0,
                                snr_gamma=None)
        accelerator.backward(parts.loss)
        accelerator.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    return {
        "variant": name, "mode": mode, "gradient_checkpointing": gc, "use_8bit_adam": eight_bit,
        "seconds_per_step": sum(timed) / len(timed), "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "trainable_params_m": sum(p.numel() for p in params) / 1e6, "loss": float(parts.loss),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "out" / "gpu"))
    parser.add_argument("--work", default="/tmp/raybooth-gpu-bench")
    parser.add_argument("--variant", help="run one variant in this process (used by the parent)")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script without a GPU: the tiny model at 64 px on the CPU")
    args = parser.parse_args(argv)
    work = Path(args.work)
    model_dir = work / "sd15-random"
    resolution = 512
    if args.smoke:
        from raybooth.platform.tiny import tiny_model_path

        model_dir, resolution = tiny_model_path("tiny"), 64

    if args.variant:
        try:
            result = run_variant(args.variant, model_dir, work, args.steps, args.warmup, resolution)
        except Exception as exc:  # e.g. no bitsandbytes: recorded in the table, not fatal
            result = {"variant": args.variant, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA GPU here: this benchmark needs one (see benchmarks/gpu/README.md); "
              "--smoke checks the script on the CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if not args.smoke:
        build_sd15_random(model_dir)
    print(f"SD1.5-architecture random model ready in {time.perf_counter() - t0:.0f} s: {model_dir}", flush=True)
    results = []
    for name, *_ in VARIANTS:
        if args.only and name not in args.only:
            continue
        proc = subprocess.run(
            [sys.executable, __file__, "--variant", name, "--steps", str(args.steps), "--warmup",
             str(args.warmup), "--work", str(work), *(["--smoke"] if args.smoke else [])],
            capture_output=True, text=True, timeout=600,
        )
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        result = json.loads(line[7:]) if line else {"variant": name, "error": (proc.stderr or "no output")[-300:]}
        results.append(result)
        print(json.dumps(result), flush=True)

    rows = ["| variant | grad. checkpointing | 8-bit AdamW | s/step | peak GPU memory (GB) | trainable params (M) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        _, mode, gc, eight = next(v for v in VARIANTS if v[0] == r["variant"])
        label = "full (UNet + text encoder)" if mode == "full" else "LoRA r16 (UNet + text encoder)"
        if "error" in r:
            rows.append(f"| {label} | {'on' if gc else 'off'} | {'on' if eight else 'off'} | — | — | {r['error']} |")
        else:
            rows.append(f"| {label} | {'on' if gc else 'off'} | {'on' if eight else 'off'} | "
                        f"{r['seconds_per_step']:.3f} | {r['peak_memory_gb']:.1f} | {r['trainable_params_m']:.0f} |")
    gpu = next((r["gpu"] for r in results if "gpu" in r), "?")
    table = "\n".join(rows) + f"\n\nGPU: {gpu}; {resolution}×{resolution}, bf16, batch 1 instance + 1 class image, {args.steps} timed steps after {args.warmup} warm-up.\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_gpu.json").write_text(json.dumps(results, indent=2))
    (out / "train_gpu.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
