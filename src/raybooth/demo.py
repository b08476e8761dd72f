"""`make demo`: the whole platform on the embedded defaults, a few minutes on two CPU cores.

Stages run in order and share a `Demo` context; each part of the platform adds its stage to
`STAGES`. The output folder gets the images and an `index.html` that shows them.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

TINY_NOTE = (
    "The tiny model's weights are random (it exists so everything runs on a CPU in minutes), so its "
    "images look like coloured noise. What matters here is the machinery: the same commands with a "
    "real model on a GPU machine produce real images."
)


@dataclass
class Demo:
    out: Path
    items: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    next_steps: list[str] = field(default_factory=list)

    def add(self, title: str, images: list[Path], caption: str = "") -> None:
        self.items.append({"title": title, "images": [p.name for p in images], "caption": caption})

    def say(self, text: str) -> None:
        print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


def demo_scene(size: tuple[int, int] = (96, 64)) -> tuple[Image.Image, Image.Image]:
    """A drawn scene (sky, sun, ground, a house) and a mask over the house: inpainting it shows
    that everything outside the mask comes back unchanged."""
    w, h = size
    img = Image.new("RGB", size, (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, h * 2 // 3, w, h], fill=(90, 160, 70))
    d.ellipse([w - 22, 4, w - 6, 20], fill=(250, 220, 60))
    d.rectangle([30, 28, 58, 48], fill=(180, 80, 60))
    d.polygon([(26, 28), (44, 14), (62, 28)], fill=(120, 50, 40))
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle([24, 12, 64, 50], fill=255)
    return img, mask


def stage_models(demo: Demo) -> None:
    from raybooth.platform.tiny import tiny_model_path

    for name in ("tiny", "tiny-inpainting"):
        demo.say(f"model {name}: {tiny_model_path(name)}")


def stage_generate(demo: Demo) -> None:
    from raybooth.platform.pipelines import DiffusionRunner
    from raybooth.platform.generation import GenerationParams

    runner = DiffusionRunner("tiny")
    prompts = ["a photo of a toy robot", "a watercolor of a lighthouse"]
    images = runner.text_to_image(prompts, [0, 1], GenerationParams(steps=8))
    paths = []
    for i, img in enumerate(images):
        paths.append(demo.out / f"generate-{i}.png")
        img.resize((128, 128), Image.NEAREST).save(paths[-1])
    demo.add("Text-to-image (tiny model)", paths, " / ".join(prompts))


def stage_inpaint(demo: Demo) -> None:
    from raybooth.platform.masks import blur_mask
    from raybooth.platform.pipelines import DiffusionRunner
    from raybooth.platform.generation import InpaintParams

    img, mask = demo_scene()
    params = InpaintParams(steps=8, mask_blur=2, crop_margin=8)
    img.save(demo.out / "inpaint-input.png")
    mask.save(demo.out / "inpaint-mask.png")
    paths = [demo.out / "inpaint-input.png", demo.out / "inpaint-mask.png"]
    for model in ("tiny-inpainting", "tiny"):
        out = DiffusionRunner(model).inpaint(
            [img], [mask], ["a red barn"], [3], params
        )[0]
        outside = np.asarray(blur_mask(mask, params.mask_blur)) == 0
        kept = bool((np.asarray(out)[outside] == np.asarray(img)[outside]).all())
        paths.append(demo.out / f"inpaint-{model}.png")
        out.save(paths[-1])
        demo.say(f"inpaint with {model}: unmasked pixels unchanged = {kept}")
    demo.add(
        "Inpainting: input, mask, 9-channel model, 4-channel model",
        paths,
        "crop-to-mask with an 8 px margin and a 2 px mask blur; outside the mask every pixel is the input's",
    )


def stage_train(demo: Demo) -> None:
    """DreamBooth of the demo subject (configs/train/tiny.yaml): two Ray Train workers, prior
    preservation, then images from the trained model."""
    from raybooth.jobs.train.driver import run_training
    from raybooth.platform.config import load_config
    from raybooth.platform.pipelines import DiffusionRunner
    from raybooth.platform.generation import GenerationParams

    overrides = [f"run.storage_path={(demo.out / 'runs').resolve()}"]
    if demo.state.get("class_data_dir"):  # where an earlier stage made the class images
        overrides.append(f"priors.class_data_dir={demo.state['class_data_dir']}")
    config = load_config(Path("configs/train/tiny.yaml"), overrides)
    demo.say(f"training {config.subject.instance_prompt!r} on {config.scaling.num_workers} Ray Train workers")
    summary = run_training(config)
    demo.state["train_summary"] = summary
    demo.state["trained_model"] = summary["model_path"]
    demo.say(f"trained {summary['steps']} steps, final loss {summary['final_loss']:.4f}: {summary['model_path']}")

    subject = [demo.out / f"train-subject-{i}.png" for i in range(3)]
    for src, dst in zip(sorted(Path(config.subject.instance_data_dir).glob("*.png")), subject):
        Image.open(src).convert("RGB").resize((128, 128), Image.NEAREST).save(dst)
    prompts = [config.subject.instance_prompt, f"{config.subject.instance_prompt} on a beach"]
    images = DiffusionRunner(summary["model_path"]).text_to_image(prompts, [0, 1], GenerationParams(steps=8))
    generated = []
    for i, img in enumerate(images):
        generated.append(demo.out / f"train-generate-{i}.png")
        img.resize((128, 128), Image.NEAREST).save(generated[-1])
    grids = [Path(p) for p in summary["validation_images"]]
    if grids:
        shutil.copy(grids[-1], demo.out / "train-validation.png")
        generated.append(demo.out / "train-validation.png")
    registered = f", registered as {summary.get('model_uri')}" if summary.get("registered_model") else ""
    demo.add(
        "DreamBooth on Ray Train: the subject, then the trained model's images",
        subject + generated,
        f"{summary['steps']} steps on {summary['num_workers']} workers with prior preservation "
        f"(final loss {summary['final_loss']:.4f}){registered}; prompts: " + " / ".join(prompts)
        + "; last: the validation grid written during training",
    )
    demo.next_steps.append(
        "raybooth train --config configs/train/sd15.yaml --set subject.instance_data_dir=YOUR_PHOTOS  "
        "(GPU; or ray job submit --working-dir . -- raybooth train --config configs/train/sd15.yaml)"
    )


def stage_mlflow(demo: Demo) -> None:
    """MLflow: the training run and its registered model, promoted to champion, used via pyfunc."""
    from raybooth.jobs.train.demo_mlflow import run_mlflow_stage

    run_mlflow_stage(demo)


def stage_serve(demo: Demo) -> None:
    """Ray Serve: the trained subject (or tiny) behind HTTP; one generation, one inpainting."""
    from raybooth.serve_apps.demo_stage import run_serve_stage

    run_serve_stage(demo, demo_scene())


# Each part appends its stage here (priors, training, serving, ...).
STAGES: list[Callable[[Demo], None]] = [stage_models, stage_generate, stage_inpaint, stage_train, stage_mlflow, stage_serve]


def write_index(demo: Demo) -> Path:
    parts = [
        "<!doctype html><meta charset=utf-8><title>raybooth demo</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "img{image-rendering:pixelated;width:160px;margin:4px;border:1px solid #ccc}</style>",
        "<h1>raybooth demo</h1>",
        f"<p><em>{html.escape(TINY_NOTE)}</em></p>",
    ]
    for item in demo.items:
        parts.append(f"<h2>{html.escape(item['title'])}</h2>")
        parts.append("".join(f'<img src="{html.escape(n)}" alt="{html.escape(n)}">' for n in item["images"]))
        if item["caption"]:
            parts.append(f"<p>{html.escape(item['caption'])}</p>")
    if demo.next_steps:
        parts.append("<h2>Next</h2><ul>")
        parts.extend(f"<li><code>{html.escape(s)}</code></li>" for s in demo.next_steps)
        parts.append("</ul>")
    index = demo.out / "index.html"
    index.write_text("\n".join(parts))
    (demo.out / "demo.json").write_text(json.dumps({"items": demo.items, "state": demo.state}, indent=2, default=str))
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    demo = Demo(out=out)
    demo.next_steps = [
        "raybooth generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt 'a photo of a dog' --out out/  (GPU machine, downloads the model)",
    ]
    t0 = time.perf_counter()
    for stage in STAGES:
        demo.say(f"stage {stage.__name__.removeprefix('stage_')}")
        stage(demo)
    index = write_index(demo)
    demo.say(f"done in {time.perf_counter() - t0:.0f} s")
    print(f"\nOpen {index.resolve()} to see the results.\n{TINY_NOTE}")
    for step in demo.next_steps:
        print(f"  next: {step}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
