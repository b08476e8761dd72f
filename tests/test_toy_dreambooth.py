"""DreamBooth on the toy world: `raybooth train --config configs/train/toy.yaml` teaches `toy` the
split-circle subject (examples/toy-subject/) that no caption of the grammar can ask for.

What a user relies on, scored by the pixel judge with fixed seeds:
- subject learned: `a sks circle on a {colour} background` shows the subject's pattern far more
  often than the base model does for the same prompts, on the asked background (>= 80%);
- class preserved: `a circle on a {colour} background` stays an ordinary one-coloured circle;
- prior preservation: the same run without priors drifts more on the class prompt. Drift is the
  share of class-prompt images that are no longer an ordinary one-coloured circle on the asked
  background (the judge's reading); the mean pixel change against the base model's images for
  the same seeds is printed beside it. Both runs' numbers are printed side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raybooth.platform.toy.models import toy_weights_present

REPO = Path(__file__).resolve().parents[1]
SEEDS = [101, 102, 103]

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not toy_weights_present(), reason="toy weights not built (raybooth toy build)"),
]


def _config(storage: Path, class_dir: Path, name: str, priors: bool):
    from raybooth.platform.config import load_config

    return load_config(str(REPO / "configs" / "train" / "toy.yaml"), [
        f"subject.instance_data_dir={REPO / 'examples' / 'toy-subject'}",
        f"priors.enabled={str(priors).lower()}",
        f"priors.class_data_dir={class_dir}",
        f"run.storage_path={storage}",
        f"run.name={name}",
        "train.validation_every=0",
        "tracking.enabled=false",
    ])


def _images(model, prompts: list[str]) -> list[np.ndarray]:
    from raybooth.platform.pipelines import DiffusionRunner, GenerationParams

    runner = DiffusionRunner(model)
    params = GenerationParams(steps=25, guidance_scale=4.0, scheduler="ddim")
    jobs = [(p, s) for p in prompts for s in SEEDS]
    images = runner.text_to_image([p for p, _ in jobs], [s for _, s in jobs], params)
    return [np.asarray(im.convert("RGB")) for im in images]


def _scores(images: list[np.ndarray], backgrounds: list[str]) -> dict:
    from raybooth.platform.toy.judge import judge
    from raybooth.platform.toy.subject import is_subject, subject_score

    asked = [bg for bg in backgrounds for _ in SEEDS]
    reads = [judge(im) for im in images]
    return {
        "subject_score": float(np.mean([subject_score(im) for im in images])),
        "is_subject": float(np.mean([is_subject(im) for im in images])),
        "background": float(np.mean([r.background == bg for r, bg in zip(reads, asked)])),
        "circle": float(np.mean([r.shape == "circle" for r in reads])),
        # An ordinary circle on the asked background: what the class prompt should still give.
        "ordinary": float(np.mean([r.ordinary() and r.shape == "circle" and r.background == bg
                                   for r, bg in zip(reads, asked)])),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, raybooth_home):
    import ray

    from raybooth.jobs.train.driver import run_training

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    storage = tmp_path_factory.mktemp("toy-dreambooth")
    class_dir = raybooth_home / "toy-class-images"
    with_priors = run_training(_config(storage, class_dir, "with-priors", True), progress=False)
    without = run_training(_config(storage, class_dir, "without-priors", False), progress=False)
    return with_priors, without


def test_subject_learned_class_preserved_and_priors_reduce_drift(runs):
    from raybooth.platform.toy.subject import SUBJECT

    with_priors, without = runs
    backgrounds = SUBJECT.backgrounds()
    subject_prompts = [SUBJECT.instance_prompt(bg) for bg in backgrounds]
    class_prompts = [f"a {SUBJECT.shape} on a {bg} background" for bg in backgrounds]

    base_subject = _scores(_images("toy", subject_prompts), backgrounds)
    base_class_images = _images("toy", class_prompts)
    tuned_subject = _scores(_images(str(with_priors.model_path), subject_prompts), backgrounds)
    base_class = _scores(base_class_images, backgrounds)
    drift, pixels, class_scores = {}, {}, {}
    for label, summary in (("with priors", with_priors), ("without priors", without)):
        images = _images(str(summary.model_path), class_prompts)
        class_scores[label] = _scores(images, backgrounds)
        drift[label] = 1.0 - class_scores[label]["ordinary"]
        pixels[label] = float(np.mean([np.abs(a.astype(int) - b.astype(int)).mean()
                                       for a, b in zip(images, base_class_images)]))

    print(f"\nsubject prompts — base: {base_subject}\nsubject prompts — DreamBooth: {tuned_subject}")
    print(f"class prompt (base): {base_class}")
    for label in drift:
        print(f"class prompt ({label}): {class_scores[label]}; drift {drift[label]:.2f}, "
              f"mean pixel change from base {pixels[label]:.1f}/255")

    assert tuned_subject["subject_score"] >= base_subject["subject_score"] + 0.4
    assert tuned_subject["is_subject"] >= 0.6
    assert tuned_subject["background"] >= 0.80
    assert class_scores["with priors"]["is_subject"] <= 0.2
    assert class_scores["with priors"]["circle"] >= 0.8
    assert drift["with priors"] < drift["without priors"]
