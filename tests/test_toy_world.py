"""The toy world: the generator is deterministic, the judge is exact on its images, and the
subject judge tells the split-circle subject from the grammar's ordinary shapes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raybooth.platform.toy.judge import colour_inside, judge
from raybooth.platform.toy.subject import (SUBJECT, is_subject, render_subject, subject_score,
                                           write_instance_images)
from raybooth.platform.toy.world import COLOURS, SHAPES, Scene, random_scenes, render, render_batch

pytestmark = pytest.mark.timeout(120)


def test_generator_is_deterministic_by_seed():
    a, b = random_scenes(7, 64), random_scenes(7, 64)
    assert a == b
    assert (render_batch(a) == render_batch(b)).all()
    assert random_scenes(8, 64) != a


def test_scenes_cover_the_grammar_and_keep_object_and_background_apart():
    scenes = random_scenes(0, 600)
    assert {s.colour for s in scenes} == set(COLOURS)
    assert {s.background for s in scenes} == set(COLOURS)
    assert {s.shape for s in scenes} == set(SHAPES)
    assert all(s.colour != s.background for s in scenes)
    sizes = [s.size for s in scenes]
    assert max(sizes) - min(sizes) > 0.25  # the size varies
    assert scenes[0].caption() == f"a {scenes[0].colour} {scenes[0].shape} on a {scenes[0].background} background"


def test_images_are_flat_and_centred():
    for scene in random_scenes(1, 30):
        img = np.asarray(render(scene))
        colours = {tuple(p) for p in img.reshape(-1, 3)}
        assert colours == {COLOURS[scene.colour], COLOURS[scene.background]}
        ys, xs = np.nonzero((img == COLOURS[scene.colour]).all(-1))
        h, w = img.shape[:2]
        assert abs((xs.min() + xs.max()) / 2 - (w - 1) / 2) <= 1
        assert abs((ys.min() + ys.max()) / 2 - (h - 1) / 2) <= 1


def test_judge_is_exact_on_the_generators_images():
    for scene in random_scenes(2, 1000):
        r = judge(render(scene))
        assert (r.background, r.colour, r.shape) == (scene.background, scene.colour, scene.shape), scene


def test_judge_tolerates_noise_and_reports_an_empty_image():
    rng = np.random.default_rng(0)
    scene = Scene("yellow", "triangle", "blue", 0.6)
    img = np.asarray(render(scene)).astype(np.int16)
    noisy = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    r = judge(Image.fromarray(noisy))
    assert (r.background, r.colour, r.shape) == ("blue", "yellow", "triangle")
    blank = judge(Image.new("RGB", (32, 32), COLOURS["green"]))
    assert blank.background == "green" and blank.colour is None and blank.shape is None


def test_colour_inside_reads_the_masked_region():
    scene = Scene("red", "square", "white", 0.6)
    img = render(scene)
    mask = (np.asarray(img) == COLOURS["red"]).all(-1)
    assert colour_inside(img, mask) == "red"
    assert colour_inside(img, ~mask) == "white"


def test_subject_judge(tmp_path):
    paths = write_instance_images(tmp_path, n=5)
    assert 4 <= len(paths) <= 6
    backgrounds = {judge(Image.open(p)).background for p in paths}
    assert len(backgrounds) >= 3  # varied backgrounds
    assert all(is_subject(Image.open(p)) and subject_score(Image.open(p)) > 0.95 for p in paths)
    # No caption of the grammar draws it: every ordinary scene, even a red or blue circle, scores 0.
    assert max(subject_score(render(s)) for s in random_scenes(3, 300)) < 0.2
    # Swapped halves are not the subject.
    swapped = type(SUBJECT)(left=SUBJECT.right, right=SUBJECT.left)
    assert not is_subject(render_subject(swapped, "white", 0.6))


def test_shipped_subject_images_match_the_generator():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples" / "toy-subject"
    shipped = sorted(folder.glob("*.png"))
    assert 4 <= len(shipped) <= 6
    assert all(is_subject(Image.open(p)) for p in shipped)


def test_judge_reads_a_models_rounded_square_as_a_square():
    # Diffusion models draw squares with slightly soft corners; they are still squares.
    scene = Scene("blue", "square", "green", 0.7)
    img = np.asarray(render(scene)).copy()
    mask = (img == COLOURS["blue"]).all(-1)
    ys, xs = np.nonzero(mask)
    for y, x in [(ys.min(), xs.min()), (ys.min(), xs.max()), (ys.max(), xs.min()), (ys.max(), xs.max())]:
        img[y, x] = COLOURS["green"]  # knock off each corner pixel
    assert judge(Image.fromarray(img)).shape == "square"


def test_judge_tells_an_ordinary_shape_from_the_two_coloured_subject():
    assert all(judge(render(s)).ordinary() for s in random_scenes(4, 200))
    assert not judge(render_subject(SUBJECT, "white", 0.6)).ordinary()
