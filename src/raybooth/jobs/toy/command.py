"""The `raybooth toy` command: `raybooth toy build` trains the toy models (see jobs/toy/build.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from raybooth.platform.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "toy",
        help="the toy world: train the `toy` and `toy-inpainting` base models",
        description="raybooth toy build trains the toy world's VAE, text-to-image model and "
        "inpainting model on the CPU from a seed, and writes the weights with their build record.",
    )
    sub = p.add_subparsers(dest="toy_command", required=True)
    b = sub.add_parser("build", help="train the toy models (about an hour on 2 CPU cores)")
    b.add_argument("--out", default=None, help="output folder (default: the package's assets/toy)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--vae-steps", type=int, default=3000)
    b.add_argument("--t2i-steps", type=int, default=4000)
    b.add_argument("--inpaint-steps", type=int, default=1500)
    b.add_argument("--eval-every", type=int, default=500)
    b.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared machine: OpenMP threads that "
                   "wait on each other lose badly under contention)")
    b.add_argument("--skip-t2i", action="store_true",
                   help="reuse the VAE, text encoder and UNet already in --out; train inpainting only")
    b.set_defaults(func=cmd_build)
    s = sub.add_parser("subject", help="write the toy DreamBooth subject's instance images")
    s.add_argument("--out", default="examples/toy-subject")
    s.add_argument("--num-images", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_subject)


def cmd_subject(args: argparse.Namespace) -> int:
    from raybooth.platform.toy.subject import SUBJECT, write_instance_images

    if not 1 <= args.num_images <= 64:
        raise ConfigError("--num-images must be between 1 and 64", field="num_images")
    for path in write_instance_images(args.out, n=args.num_images, seed=args.seed):
        print(path)
    print(f"instance prompt: {SUBJECT.instance_prompt()!r}, class prompt: {SUBJECT.class_prompt()!r}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from raybooth.jobs.toy.build import BuildConfig, build
    from raybooth.jobs.toy.inpainting import InpaintConfig
    from raybooth.jobs.toy.text_to_image import T2IConfig
    from raybooth.platform.toy.models import ASSETS

    for name in ("vae_steps", "t2i_steps", "inpaint_steps", "eval_every", "threads"):
        if getattr(args, name) < (1 if name in ("eval_every", "threads") else 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive", field=name)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out) if args.out else ASSETS
    if args.skip_t2i and not (out / "unet" / "config.json").is_file():
        raise ConfigError(f"--skip-t2i needs a finished text-to-image stage in {out}", field="out")
    cfg = BuildConfig(
        out=out, seed=args.seed, vae_steps=args.vae_steps, threads=args.threads, skip_t2i=args.skip_t2i,
        t2i=T2IConfig(steps=args.t2i_steps, eval_every=args.eval_every),
        inpaint=InpaintConfig(steps=args.inpaint_steps, eval_every=args.eval_every),
    )
    record = build(cfg)
    last = record["t2i_curve"][-1]
    print(f"toy: background {last['background']:.2f} colour {last['colour']:.2f} shape {last['shape']:.2f}")
    if record.get("inpaint_curve"):
        print(f"toy-inpainting: colour inside mask {record['inpaint_curve'][-1]['colour_inside']:.2f}")
    print(out / "BUILD.md")
    return 0
