"""`raybooth evaluate --config FILE [--set k=v ...]`, or `--model M --subject-dir DIR` for a quick
run. The last line printed is the path of evaluation.json."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from raybooth.platform.config import add_config_arguments


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="subject fidelity as in the DreamBooth paper (DINO, CLIP-I, CLIP-T) on Ray actors",
        description="Generate images of the subject from the evaluation prompts with the model, "
        "embed them and the subject's photos with DINO and CLIP on a pool of Ray actors, and "
        "write evaluation.json (each metric's mean and 95%% bootstrap interval, per-prompt values, "
        "the real-vs-real baseline), the images and grid.png into output_dir. Configs: "
        "configs/evaluate/tiny.yaml (seconds on a CPU), configs/evaluate/sd15.yaml.",
    )
    add_config_arguments(p, "an evaluation config (configs/evaluate/*.yaml)", "evaluation.images_per_prompt=2")
    p.add_argument("--model", default=None, help="the model to judge: tiny | DIR | org/name | models:/NAME@ALIAS")
    p.add_argument("--lora", default=None, help="a LoRA adapter folder on top of --model")
    p.add_argument("--subject-dir", default=None, help="the subject's own photos (subject.instance_data_dir)")
    p.add_argument("--identifier", default=None, help="the identifier token (subject.identifier)")
    p.add_argument("--class-noun", default=None, help="the subject's class, e.g. 'dog' (evaluation.class_noun)")
    p.add_argument("--out", default=None, help="output folder (output_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)


def _quick_overrides(args: argparse.Namespace) -> list[str]:
    """The quick-mode flags as overrides (applied before --set, so --set wins)."""
    out = []
    if args.model:
        out.append(f"model={args.model}")
    if args.lora:
        out.append(f"lora={args.lora}")
    if args.subject_dir:
        out.append(f"subject.instance_data_dir={args.subject_dir}")
    if args.identifier:
        ident = args.identifier
        # Without --class-noun the noun cannot be read from this prompt: the error asks for it.
        noun = f" {args.class_noun}" if args.class_noun else ""
        out += [f"subject.identifier={ident}", f"subject.instance_prompt=a photo of {ident}{noun}"]
    if args.class_noun:
        out.append(f"evaluation.class_noun={args.class_noun}")
    if args.out:
        out.append(f"output_dir={args.out}")
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from raybooth.jobs.evaluate.config import EvaluateConfig
    from raybooth.jobs.evaluate.job import evaluate_config
    from raybooth.platform.config import load_config
    from raybooth.platform.quiet import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.config is None and args.subject_dir and not args.class_noun:
        from raybooth.platform.errors import UserError

        # Without a config the subject's class is unknown, and the prompts name it.
        raise UserError(
            "--class-noun is needed with --subject-dir and no --config: the evaluation prompts name "
            "the subject's class (e.g. --class-noun dog gives 'a sks dog in the snow')",
            field="--class-noun",
        )
    config = load_config(args.config, _quick_overrides(args) + list(args.overrides), schema=EvaluateConfig)
    result = evaluate_config(config, progress=not args.no_progress)
    report = result.report
    for name, est in report.metrics.items():
        base = report.baseline.get(name)
        real = f"   (real vs real {base.mean:.4f})" if base else ""
        print(f"{name:8s} {est.mean:.4f}  95% CI [{est.low:.4f}, {est.high:.4f}]{real}")
    print(f"{report.counts['generated']} images, {report.counts['prompts']} prompts; grid: "
          f"{result.path.parent / report.files['grid']}")
    print(result.path)
    return 0
