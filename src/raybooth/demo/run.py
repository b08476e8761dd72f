"""The demo's stages, in order, and its command line (`make demo`)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Callable

from raybooth.demo.report import Figure, Report
from raybooth.demo.state import DemoState
from raybooth.demo.world import (
    instance_figures,
    scene_for_serving,
    stage_base_model,
    stage_inpaint,
    stage_personalisation,
)

NOTE = (
    "Everything below ran on the CPU of this machine, on the toy world: small Stable Diffusion "
    "models that raybooth trained itself on coloured shapes (raybooth.platform.toy), read back by a "
    "pixel judge. The same commands with a real model id on a GPU make real photographs."
)


def stage_models(report: Report, state: DemoState) -> None:
    from raybooth.platform.models import resolve_model

    for ref in (state.base_model, state.inpainting_model):
        resolved = resolve_model(ref)
        report.say(f"model {ref}: {resolved.path} (build {resolved.revision})")


def stage_train(report: Report, state: DemoState) -> None:
    """DreamBooth of the toy subject: class images from the actor pool, two Ray Train workers,
    prior preservation, MLflow tracking and registration."""
    from raybooth.jobs.train.driver import run_training
    from raybooth.platform.config import load_config

    # Tracked, so the MLflow stage has a run and a registered version to show.
    config = load_config(state.train_config, [f"run.storage_path={(report.out / 'runs').resolve()}",
                                              "tracking.enabled=true"])
    report.say(f"training {config.subject.instance_prompt!r} on {config.scaling.num_workers} Ray Train workers "
               f"({config.train.max_steps} steps, priors {'on' if config.priors.enabled else 'off'})")
    summary = run_training(config, progress=False)
    state.trained = summary
    report.facts["training"] = {"steps": summary.steps, "final_loss": summary.final_loss,
                                "train_seconds": summary.train_seconds, "model": str(summary.model_path),
                                "model_uri": summary.model_uri}
    report.say(f"trained {summary.steps} steps in {summary.train_seconds:.0f} s, final loss "
               f"{summary.final_loss:.4f}: {summary.model_path}")

    from PIL import Image

    report.add("The subject: instance images", instance_figures(report, Path(config.subject.instance_data_dir)),
               f"identifier {config.subject.identifier!r}, instance prompt {config.subject.instance_prompt!r}")
    if summary.class_images_dir:
        classes = sorted(Path(summary.class_images_dir).glob("*.png"))[:8]
        report.add("Class images made by the pool of Ray actors (prior preservation)",
                   [Figure(report.save(Image.open(p), f"class-{i}.png"), p.name) for i, p in enumerate(classes)],
                   f"class prompt {config.subject.class_prompt!r}; content-addressed set {summary.class_image_set}")
    grids = summary.validation_images
    if grids:
        shown = [grids[0], grids[-1]] if len(grids) > 1 else grids
        report.add("Validation grids written during training",
                   [Figure(report.save(Image.open(p), f"validation-{p.stem}.png", side=512), p.stem) for p in shown],
                   " / ".join(config.train.validation_prompts))
    report.next_steps.append(
        "raybooth train --config configs/train/sd15.yaml --set subject.instance_data_dir=YOUR_PHOTOS  "
        "(a GPU machine; or raybooth submit train --config configs/train/sd15.yaml --address http://HEAD:8265)")


def stage_mlflow(report: Report, state: DemoState) -> None:
    from raybooth.jobs.train.demo_mlflow import run_mlflow_stage

    state.champion_uri = run_mlflow_stage(report, state.trained, _instance_prompt(state))


def _instance_prompt(state: DemoState) -> str:
    from raybooth.platform.config import load_config

    return load_config(state.train_config, []).subject.instance_prompt


def stage_serve(report: Report, state: DemoState) -> None:
    """Ray Serve: the base model and the trained subject side by side, one inpainting model."""
    from raybooth.platform.generation import defaults_for
    from raybooth.platform.models import resolve_model
    from raybooth.serve_apps.demo_stage import DemoServing, run_serve_stage

    base = {"name": state.base_model, "model": state.base_model, "warmup_steps": 1}
    text_to_image = [base]
    generation_model, prompt = state.base_model, "a red circle on a blue background"
    if state.trained is not None:
        subject_ref = state.champion_uri or str(state.trained.model_path)
        text_to_image.append({"name": "subject", "model": subject_ref, "warmup_steps": 1})
        generation_model, prompt = "subject", _instance_prompt(state)
    d = defaults_for(resolve_model(state.base_model).path)
    serving = DemoServing(
        args={"text_to_image": text_to_image,
              "inpainting": [{"name": state.inpainting_model, "model": state.inpainting_model, "warmup_steps": 1}],
              "limits": {"max_side": 256}},
        description=f"{state.base_model} and the trained subject" if state.trained else state.base_model,
        generation_model=generation_model, generation_prompt=prompt,
        inpainting_model=state.inpainting_model, inpainting_prompt="a yellow circle",
        steps=d.steps, guidance_scale=d.guidance_scale,
    )
    outcome = run_serve_stage(report, serving, scene_for_serving())
    report.facts["serve"] = vars(outcome)


STAGES: list[Callable[[Report, DemoState], None]] = [
    stage_models, stage_base_model, stage_inpaint, stage_train, stage_personalisation, stage_mlflow,
    stage_serve,
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raybooth.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--train-config", default=None, help="default: configs/train/toy.yaml")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    report = Report(out=out)
    state = DemoState()
    from raybooth.platform.toy.models import toy_weights_present

    if not toy_weights_present():  # a checkout without the shipped toy weights: the plumbing on tiny
        report.say("the toy models' weights are missing (raybooth toy build makes them): running on tiny")
        state = DemoState(base_model="tiny", inpainting_model="tiny-inpainting",
                          train_config=Path("configs/train/tiny.yaml"))
    if args.train_config:
        state.train_config = Path(args.train_config)
    t0 = time.perf_counter()
    for stage in STAGES:
        started = time.perf_counter()
        report.say(f"stage {stage.__name__.removeprefix('stage_')}")
        stage(report, state)
        report.facts.setdefault("stage_seconds", {})[stage.__name__] = round(time.perf_counter() - started, 1)
    index = report.write_index(NOTE)
    report.say(f"done in {time.perf_counter() - t0:.0f} s")
    print(f"\nOpen {index.resolve()} to see the results.")
    for step in report.next_steps:
        print(f"  next: {step}")
    return 0
