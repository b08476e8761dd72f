"""`raybooth …` — the command line.

Each command is a small function here that parses arguments and calls into the package; the work
lives in `platform`, `jobs`, `tune` and `serve_apps`. Errors a user can cause (`UserError`) end
with a one-paragraph message and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Callable

from raybooth.platform.errors import UserError
from raybooth.platform.quiet import install_log_filters

# Commands that live with their part: name -> ("module:function", one-line help). The function
# takes the subparsers object and registers the command's parser (with `func` set). Only the
# command being run is imported, so `raybooth --help` and `raybooth generate` never pay for the
# imports of Ray Train, Serve or MLflow.
PART_COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("raybooth.platform.mlflow.commands:register_models",
               "list registered models, move aliases (MLflow registry)"),
    "mlflow-ui": ("raybooth.platform.mlflow.commands:register_ui",
                  "open the MLflow UI on the embedded tracking store"),
    "priors": ("raybooth.jobs.priors.job:register",
               "make the class images for prior preservation (pool of Ray actors)"),
    "train": ("raybooth.jobs.train.driver:register", "DreamBooth fine-tuning on Ray Train"),
    "toy": ("raybooth.jobs.toy.command:register", "the toy world: train the toy and toy-inpainting models"),
    "tune": ("raybooth.tune.command:register",
             "Ray Tune sweep over training: ASHA, MLflow parent/child runs, best model registered"),
    "evaluate": ("raybooth.jobs.evaluate.command:register",
                 "subject fidelity as in the DreamBooth paper: DINO, CLIP-I, CLIP-T (Ray actors)"),
    "serve": ("raybooth.serve_apps.command:register",
              "run the Serve app (text-to-image and inpainting over HTTP) in the foreground"),
    "submit": ("raybooth.jobs.submit.command:register_submit",
               "run train/tune/evaluate/priors as a Ray job on a cluster (follows its logs)"),
    "jobs": ("raybooth.jobs.submit.command:register_jobs",
             "list, follow and stop the jobs on a Ray cluster"),
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="tiny | tiny-inpainting | DIR | org/name | models:/NAME@ALIAS")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--variant", help="Hub weights variant, e.g. fp16")
    p.add_argument("--cache-dir", help="Hugging Face cache directory")
    p.add_argument("--offline", action="store_true", help="never touch the network (also HF_HUB_OFFLINE=1)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.ckpt pickle weights (runs code from the file)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | fp16 | bf16")


def _add_generation_args(p: argparse.ArgumentParser) -> None:

    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-images", type=int, default=1)
    # None: the model's own recommended settings (raybooth-defaults.json in its folder), else
    # raybooth's global defaults (raybooth.platform.generation.GENERATION_DEFAULTS).
    p.add_argument("--steps", type=int, default=None, help="default: the model's, else 20")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's, else 7.5")
    p.add_argument("--scheduler", default=None, help="default: the model's, else ddim")
    p.add_argument("--seed", type=int, default=None, help="image k uses seed+k; random when absent")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--lora", default=None, help="a LoRA adapter folder from `raybooth train` (mode lora)")
    p.add_argument("--out", required=True, help="output folder for PNGs and JSON sidecars")


def _runner(args: argparse.Namespace):
    from raybooth.platform.config import ModelOptions
    from raybooth.platform.pipelines import DiffusionRunner

    options = ModelOptions(
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        local_files_only=True if args.offline else None,
        allow_pickle=args.allow_pickle,
    )
    runner = DiffusionRunner(args.model, options=options, device=args.device, dtype=args.dtype)
    lora = runner.load_lora(args.lora, name="cli") if args.lora else None
    if lora is None and runner.adapters:
        lora = next(iter(runner.adapters))
    return runner, lora


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.num_images < 1:
        raise UserError("--num-images must be at least 1", field="num_images")
    base = args.seed if args.seed is not None else secrets.randbelow(2**31)
    return [base + k for k in range(args.num_images)]


def _write(out: Path, command: str, images, seeds, record: dict) -> list[Path]:
    from raybooth import __version__

    out.mkdir(parents=True, exist_ok=True)
    written = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k, (img, seed) in enumerate(zip(images, seeds)):
        path = out / f"{command}-{stamp}-{k:03d}-{seed}.png"
        img.save(path)
        sidecar = {"command": command, "file": path.name, "seed": seed, "index": k,
                   "raybooth_version": __version__, **record}
        path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, default=str))
        written.append(path)
    return written


def _params(cls, args: argparse.Namespace, model_dir=None, **extra):
    """The call's parameters: what the command line gave, the rest from the model's defaults."""
    from raybooth.platform.generation import defaults_for

    d = defaults_for(model_dir)
    return cls(steps=d.steps if args.steps is None else args.steps,
               guidance_scale=d.guidance_scale if args.guidance_scale is None else args.guidance_scale,
               scheduler=d.scheduler if args.scheduler is None else args.scheduler,
               height=args.height, width=args.width, **extra)


def cmd_generate(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from raybooth.platform.generation import GenerationParams

    _params(GenerationParams, args).check()  # what was given, checked before any model loads
    seeds = _seeds(args)
    runner, lora = _runner(args)
    params = _params(GenerationParams, args, runner.resolved.path, lora=lora)
    t0 = time.perf_counter()
    prompts = [args.prompt] * len(seeds)
    negatives = [args.negative_prompt] * len(seeds) if args.negative_prompt else None
    images = runner.text_to_image(prompts, seeds, params, negatives)
    infer = time.perf_counter() - t0
    record = {"prompt": args.prompt, "negative_prompt": args.negative_prompt,
              "lora_path": args.lora, **asdict(params), **runner.describe(),
              "timings": {"load_s": round(runner.load_s, 3), "inference_s": round(infer, 3),
                          "per_image_s": round(infer / len(images), 3)}}
    for path in _write(Path(args.out), "generate", images, seeds, record):
        print(path)


def cmd_inpaint(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from raybooth.platform.generation import InpaintParams
    from raybooth.platform.images import check_same_size, open_image, open_mask

    extra = dict(strength=args.strength, mask_blur=args.mask_blur, crop_margin=args.crop_margin)
    _params(InpaintParams, args, **extra).check()  # what was given, checked before any model loads
    image = open_image(args.image, name=str(args.image))
    mask = open_mask(args.mask, name=str(args.mask))
    check_same_size(image, mask, str(args.image), str(args.mask))
    seeds = _seeds(args)
    runner, lora = _runner(args)
    params = _params(InpaintParams, args, runner.resolved.path, lora=lora, **extra)
    t0 = time.perf_counter()
    n = len(seeds)
    negatives = [args.negative_prompt] * n if args.negative_prompt else None
    images = runner.inpaint([image] * n, [mask] * n, [args.prompt] * n, seeds, params, negatives)
    infer = time.perf_counter() - t0
    record = {"prompt": args.prompt, "negative_prompt": args.negative_prompt,
              "image": str(args.image), "mask": str(args.mask), "lora_path": args.lora,
              **asdict(params), **runner.describe(),
              "timings": {"load_s": round(runner.load_s, 3), "inference_s": round(infer, 3),
                          "per_image_s": round(infer / n, 3)}}
    for path in _write(Path(args.out), "inpaint", images, seeds, record):
        print(path)


def _chosen_command(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; with `argv`, only the part command it names is imported and registered
    (the others appear in `--help` by name and help line only)."""
    chosen = _chosen_command(argv) if argv is not None else None
    parser = argparse.ArgumentParser(prog="raybooth", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="text-to-image with any model reference")
    _add_model_args(gen)
    _add_generation_args(gen)
    gen.set_defaults(func=cmd_generate)

    inp = sub.add_parser("inpaint", help="repaint the white area of a mask; the rest is kept exactly")
    _add_model_args(inp)
    _add_generation_args(inp)
    inp.add_argument("--image", required=True)
    inp.add_argument("--mask", required=True, help="white = repaint, black = keep")
    inp.add_argument("--strength", type=float, default=1.0)
    inp.add_argument("--mask-blur", type=float, default=0.0, help="Gaussian blur radius (px) of the mask edge")
    inp.add_argument("--crop-margin", type=int, default=None,
                     help="crop to the mask plus this margin (px), repaint at full resolution, paste back")
    inp.set_defaults(func=cmd_inpaint)

    for name, (target, help_line) in PART_COMMANDS.items():
        if argv is not None and name != chosen:
            sub.add_parser(name, help=help_line, add_help=False)
            continue
        module, func = target.split(":")
        register: Callable = getattr(importlib.import_module(module), func)
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    install_log_filters()  # before any command imports diffusers/transformers
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"raybooth {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raybooth {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
