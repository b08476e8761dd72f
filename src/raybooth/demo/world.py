"""The toy-world stages of the demo: what a CPU can show for real.

The `toy` models were trained by raybooth on a procedural world of coloured shapes
(`raybooth.platform.toy`), and a pixel judge reads every image, so each picture on the page comes
with what was asked and what the judge saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from raybooth.demo.report import Figure, Report
from raybooth.demo.state import DemoState
from raybooth.platform.generation import GenerationParams, InpaintParams, defaults_for
from raybooth.platform.toy.judge import colour_inside, judge
from raybooth.platform.toy.scoring import inpaint_cases
from raybooth.platform.toy.world import RESOLUTION, random_scenes, render

SEED = 0


def _params(runner, cls=GenerationParams, **extra):
    d = defaults_for(runner.resolved.path)
    return cls(steps=d.steps, guidance_scale=d.guidance_scale, scheduler=d.scheduler, **extra)


def stage_base_model(report: Report, state: DemoState) -> None:
    """`toy` follows prompts: captions it never saw together, each image read by the judge."""
    from raybooth.platform.pipelines import DiffusionRunner

    runner = DiffusionRunner(state.base_model)
    scenes = random_scenes(1234, 12)
    images = runner.text_to_image([s.caption() for s in scenes], [SEED + i for i in range(len(scenes))],
                                  _params(runner))
    figures, hits = [], np.zeros(3)
    for i, (scene, image) in enumerate(zip(scenes, images)):
        r = judge(image)
        got = [r.background == scene.background, r.colour == scene.colour, r.shape == scene.shape]
        hits += got
        caption = f"{scene.caption()} — judge: {r.colour} {r.shape} on {r.background}"
        figures.append(Figure(report.save(image, f"base-{i:02d}.png"), caption, all(got)))
    n = len(scenes)
    score = {"background": hits[0] / n, "colour": hits[1] / n, "shape": hits[2] / n}
    report.facts["base_prompt_following"] = score
    report.say(f"toy follows prompts: background {score['background']:.0%}, colour {score['colour']:.0%}, "
               f"shape {score['shape']:.0%} of {n}")
    report.add("The base model `toy` follows prompts", figures,
               f"{n} random captions, one image each; the judge read the asked background in "
               f"{score['background']:.0%}, the object colour in {score['colour']:.0%} and the shape in "
               f"{score['shape']:.0%} (tests/test_toy_models.py asserts >= 95 / 90 / 85 % over 96 images)")


def stage_inpaint(report: Report, state: DemoState) -> None:
    """`toy-inpainting` repaints a masked object in the asked colour; the rest stays exact."""
    from raybooth.platform.pipelines import DiffusionRunner

    runner = DiffusionRunner(state.inpainting_model)
    figures = []
    for i, case in enumerate(inpaint_cases(7, 4)):
        source = render(case.source, RESOLUTION)
        mask = case.mask(RESOLUTION)
        mask_image = Image.fromarray((mask * 255).astype(np.uint8))
        out = runner.inpaint([source], [mask_image], [case.prompt()], [SEED + i], _params(runner, InpaintParams))[0]
        read = colour_inside(out, mask)
        kept = bool((np.asarray(out)[~mask] == np.asarray(source)[~mask]).all())
        figures += [Figure(report.save(source, f"inpaint-{i}-input.png"), case.source.caption()),
                    Figure(report.save(mask_image, f"inpaint-{i}-mask.png"), "mask"),
                    Figure(report.save(out, f"inpaint-{i}-out.png"),
                           f"{case.prompt()} — judge: {read}; outside unchanged: {kept}", read == case.colour and kept)]
    report.add("Inpainting with `toy-inpainting`", figures,
               "input, mask (white = repaint), result: the object repainted as asked; every pixel outside "
               "the mask is the input's, byte for byte")


def scene_for_serving() -> tuple[Image.Image, Image.Image]:
    """A toy scene and a mask over its object, for the Serve stage's inpainting request."""
    case = inpaint_cases(11, 1)[0]
    mask = Image.fromarray((case.mask(RESOLUTION) * 255).astype(np.uint8))
    return render(case.source, RESOLUTION), mask


def instance_figures(report: Report, folder: Path) -> list[Figure]:
    return [Figure(report.save(Image.open(p), f"subject-{i}.png"), p.name)
            for i, p in enumerate(sorted(folder.glob("*.png")))]


def stage_personalisation(report: Report, state: DemoState) -> None:
    """Before and after DreamBooth, the same prompts and seeds: the base model cannot draw the
    subject (its captions cannot say "split"), the trained one draws it on the asked background,
    and the class prompt still gives an ordinary one-coloured shape (prior preservation)."""
    from raybooth.platform.pipelines import DiffusionRunner
    from raybooth.platform.toy.subject import SUBJECT, subject_score

    if state.trained is None or state.base_model != "toy":
        return
    backgrounds = SUBJECT.backgrounds()
    seeds = list(range(len(backgrounds)))
    personal = [SUBJECT.instance_prompt(bg) for bg in backgrounds]
    plain = [f"a {SUBJECT.shape} on a {bg} background" for bg in backgrounds]
    base = DiffusionRunner(state.base_model)
    trained = DiffusionRunner(str(state.trained.model_path))
    before = base.text_to_image(personal, seeds, _params(base))
    after = trained.text_to_image(personal, seeds, _params(trained))
    classes = trained.text_to_image(plain, seeds, _params(trained))

    def row(images, prompts, tag, subject_expected: bool) -> tuple[list[Figure], list[float], int]:
        figures, scores, on_background = [], [], 0
        for i, (image, prompt, bg) in enumerate(zip(images, prompts, backgrounds)):
            score = subject_score(image)
            read = judge(image)
            on_background += read.background == bg
            scores.append(score)
            ok = (score >= 0.6) == subject_expected and read.background == bg
            figures.append(Figure(report.save(image, f"{tag}-{i}.png"),
                                  f"{prompt} — subject score {score:.2f}, background {read.background}", ok))
        return figures, scores, on_background

    f_before, s_before, _ = row(before, personal, "before", subject_expected=False)
    f_after, s_after, bg_after = row(after, personal, "after", subject_expected=True)
    f_class, s_class, _ = row(classes, plain, "class", subject_expected=False)
    n = len(backgrounds)
    facts = {"subject_score_base": float(np.mean(s_before)), "subject_score_trained": float(np.mean(s_after)),
             "background_fidelity_trained": bg_after / n, "subject_score_class_prompt": float(np.mean(s_class))}
    report.facts["personalisation"] = facts
    report.say(f"subject score {facts['subject_score_base']:.2f} (base) -> {facts['subject_score_trained']:.2f} "
               f"(trained); background as asked {bg_after}/{n}; class prompt {facts['subject_score_class_prompt']:.2f}")
    report.add("Before DreamBooth: the base model on the subject's prompt", f_before,
               f"mean subject score {facts['subject_score_base']:.2f}: the base model has never seen the subject")
    report.add("After DreamBooth: the trained model, same prompts and seeds", f_after,
               f"mean subject score {facts['subject_score_trained']:.2f}; the asked background in {bg_after} of {n}")
    report.add("After DreamBooth, the class prompt: still an ordinary shape", f_class,
               f"mean subject score {facts['subject_score_class_prompt']:.2f} (prior preservation keeps the class)")
