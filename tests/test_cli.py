"""`raybooth generate` / `raybooth inpaint`: images, sidecars, and user errors without tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from raybooth.cli import main


def test_generate_writes_images_and_sidecars(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--model", "tiny", "--prompt", "a photo of a toy", "--num-images", "2",
                 "--seed", "40", "--steps", "3", "--scheduler", "euler_a", "--width", "72", "--out", str(out)])
    assert code == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    for k, png in enumerate(pngs):
        meta = json.loads(png.with_suffix(".json").read_text())
        assert meta["seed"] == 40 + k and meta["scheduler"] == "euler_a" and meta["steps"] == 3
        assert meta["model"] == "tiny" and meta["model_revision"] == "v1"
        assert meta["prompt"] == "a photo of a toy" and meta["timings"]["inference_s"] > 0
        assert Image.open(png).size == (72, 64)
    assert str(pngs[0]) in capsys.readouterr().out


def test_generate_without_seed_records_the_seed_it_chose(tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "x", "--steps", "2", "--out", str(out)]) == 0
    meta = json.loads(next(out.glob("*.json")).read_text())
    assert isinstance(meta["seed"], int)
    again = tmp_path / "again"
    main(["generate", "--prompt", "x", "--steps", "2", "--seed", str(meta["seed"]), "--out", str(again)])
    assert next(out.glob("*.png")).read_bytes() == next(again.glob("*.png")).read_bytes()


def test_inpaint_keeps_unmasked_pixels(tmp_path):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (20, 20, 44, 40))
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    code = main(["inpaint", "--model", "tiny-inpainting", "--image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--prompt", "a hat", "--steps", "3",
                 "--seed", "1", "--crop-margin", "8", "--out", str(out)])
    assert code == 0
    result = np.asarray(Image.open(next(out.glob("*.png"))))
    keep = np.asarray(mask) == 0
    assert (result[keep] == np.asarray(image)[keep]).all()
    meta = json.loads(next(out.glob("*.json")).read_text())
    assert meta["crop_margin"] == 8 and meta["mask"].endswith("mask.png")


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    (tmp_path / "bad.png").write_text("nope")
    Image.new("L", (8, 8)).save(tmp_path / "m.png")
    code = main(["inpaint", "--image", str(tmp_path / "bad.png"), "--mask", str(tmp_path / "m.png"),
                 "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.png" in err and "not an image" in err and "Traceback" not in err
    assert main(["generate", "--prompt", "x", "--scheduler", "warp", "--out", str(tmp_path)]) == 2
    assert "unknown scheduler 'warp'" in capsys.readouterr().err
    assert main(["generate", "--model", "no such model", "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "is not a reference raybooth understands" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("raybooth")
    proc = subprocess.run([str(exe), "generate", "--prompt", "x", "--height", "30", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "height must be a positive multiple of 8" in proc.stderr
    assert "Traceback" not in proc.stderr
