"""Hostile and unusual image files through every way an image enters raybooth except HTTP
(tests/test_serve_hardening.py sends the same corpus over HTTP): the decoder itself, the CLI
(`raybooth inpaint`) and training (instance images checked on the driver before any worker
starts; class images read back in the worker). Each file either decodes as documented or is an
error that names the file: exit status 2 and one line, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from _hostile_images import Case, check_decoded, corpus
from raybooth.platform.errors import ImageError
from raybooth.platform.images import open_image, open_image_and_alpha_mask, open_mask

pytestmark = pytest.mark.timeout(120)

CASES = corpus()
IDS = [c.name for c in CASES]
REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "examples" / "demo-subject"


def _write(tmp_path: Path, case: Case) -> Path:
    path = tmp_path / f"{case.name}{case.suffix}"
    path.write_bytes(case.data)
    return path


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_decoder_answers_every_file_with_an_image_or_an_error_naming_it(tmp_path, case):
    path = _write(tmp_path, case)
    for source in (path, case.data):  # a file on disk and the same bytes from an upload
        if case.ok:
            check_decoded(case, open_image(source, name=str(path)))
            assert open_mask(source, name="mask").mode == "L"
            continue
        with pytest.raises(ImageError) as err:
            open_image(source, name=str(path))
        assert err.value.message.startswith(f"{path}: "), err.value.message
        assert case.expect in err.value.message, err.value.message
        assert ("over the limit" in err.value.message) == case.too_large
        with pytest.raises(ImageError) as err:
            open_mask(source, name="mask")
        assert err.value.field == "mask"


def test_masks_follow_white_means_repaint_or_the_openai_transparency_convention():
    def png(img: Image.Image) -> bytes:
        from _hostile_images import encode

        return encode(img, "PNG")

    grey = Image.new("L", (8, 8), 0)
    grey.putpixel((1, 1), 255)
    assert open_mask(png(grey)).getpixel((1, 1)) == 255 and open_mask(png(grey)).getpixel((0, 0)) == 0
    # OpenAI: the picture itself with a transparent hole: the hole is repainted, the rest kept.
    holed = Image.new("RGBA", (8, 8), (200, 30, 30, 255))
    holed.putpixel((2, 3), (0, 0, 0, 0))
    mask = open_mask(png(holed))
    assert mask.getpixel((2, 3)) == 255 and mask.getpixel((0, 0)) == 0
    # Without a mask, the image's own transparency is the mask (and the image is composited on white).
    image, alpha = open_image_and_alpha_mask(png(holed))
    assert image.getpixel((2, 3)) == (255, 255, 255) and alpha.getpixel((2, 3)) == 255
    assert open_image_and_alpha_mask(png(Image.new("RGBA", (8, 8), (1, 2, 3, 255))))[1] is None


# ------------------------------------------------------------------------------ CLI


BAD = [c for c in CASES if not c.ok]
BAD_IDS = [c.name for c in BAD]


@pytest.mark.parametrize("case", BAD, ids=BAD_IDS)
def test_raybooth_inpaint_exits_2_naming_the_file(tmp_path, case, capsys):
    """Every refused file is exit 2 with one line naming it, before any model is loaded (the
    usable odd files run like any other image: tests/test_cli.py covers runs)."""
    from raybooth.cli import main

    path = _write(tmp_path, case)
    good_mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(good_mask)
    for image, mask in ((path, good_mask), (good_mask, path)):  # as the image, then as the mask
        code = main(["inpaint", "--model", "tiny-inpainting", "--image", str(image), "--mask", str(mask),
                     "--prompt", "a barn", "--steps", "1", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith(f"raybooth inpaint: error: {path}: ") and case.expect in err, err
        assert "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_the_reported_case_a_png_signature_then_junk_is_exit_2_in_a_real_process(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 20)
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    proc = subprocess.run(
        [sys.executable, "-m", "raybooth.cli", "inpaint", "--image", str(broken), "--mask",
         str(tmp_path / "mask.png"), "--prompt", "a barn", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{broken}: the file is corrupt" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ training


def _subject_with(tmp_path: Path, case: Case) -> Path:
    import shutil

    folder = tmp_path / "subject"
    shutil.copytree(SUBJECT, folder)
    _write(folder, case)
    return folder


@pytest.mark.parametrize("case", BAD, ids=BAD_IDS)
def test_an_instance_folder_with_one_bad_file_is_refused_naming_it(tmp_path, case):
    from raybooth.jobs.train.inputs import check_instance_images
    from raybooth.platform.config import TrainConfig, with_overrides

    folder = _subject_with(tmp_path, case)
    config = with_overrides(TrainConfig(), {"subject.instance_data_dir": str(folder)})
    with pytest.raises(ImageError) as err:
        check_instance_images(config)
    message = err.value.message
    assert f"{case.name}{case.suffix}" in message and case.expect in message, message
    assert "1 of 6 instance image(s)" in message and "robot-0.png" not in message
    assert err.value.field == "subject.instance_data_dir"


def test_the_usable_odd_files_train_as_documented(tmp_path):
    """16-bit, CMYK, EXIF-rotated, palette+transparency, animated and 1x1 instance images are
    accepted and become RGB training images at the training resolution."""
    from raybooth.jobs.train.data import load_images

    usable = [c for c in CASES if c.ok]
    images = load_images([c.data for c in usable], 32, "instance image", [c.name for c in usable])
    assert all(img.mode == "RGB" and min(img.size) == 32 for img in images)


def test_raybooth_train_refuses_a_corrupt_instance_image_before_any_worker_starts(tmp_path):
    # Its own process: the suite's shared Ray would hide whether `raybooth train` starts one.
    import subprocess
    import sys

    case = next(c for c in CASES if c.name == "truncated-jpeg")
    folder = _subject_with(tmp_path, case)
    out = subprocess.run(
        [sys.executable, "-m", "raybooth.cli", "train", "--no-progress",
         "--set", f"subject.instance_data_dir={folder}", "--set", f"run.storage_path={tmp_path / 'runs'}",
         "--set", "tracking.enabled=false", "--set", "priors.enabled=false", "--set", "scaling.num_workers=1"],
        capture_output=True, text=True, timeout=120,
    )
    err = out.stdout + out.stderr
    assert out.returncode == 2, err
    assert f"{case.name}{case.suffix}" in err and "Traceback" not in err, err
    assert "Started a local Ray instance" not in err, "Ray was started before the inputs were checked"
    assert "Connected to Ray cluster" not in err, "a Ray cluster was joined before the inputs were checked"
    assert not (tmp_path / "runs").exists()


def test_class_images_read_back_in_the_worker_name_the_bad_one():
    from raybooth.jobs.train.data import load_images

    good = next(c for c in CASES if c.name == "one-pixel").data
    bad = next(c for c in CASES if c.name == "truncated-png").data
    with pytest.raises(ImageError, match=r"class image 1: the file is corrupt or truncated"):
        load_images([good, bad], 32, "class image", ["0", "1"])
