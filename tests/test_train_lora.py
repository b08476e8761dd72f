"""DreamBooth-LoRA on one Ray Train worker (tiny model, CPU), without prior preservation, with
text-encoder adapters; the export is loaded by `raybooth generate --lora` and by inpainting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _train_support import small_config
from PIL import Image
from safetensors.torch import load_file

from raybooth.jobs.train.driver import run_training
from raybooth.jobs.train.handoff import TrainingSummary
from raybooth.jobs.train.metrics import step_metrics
from raybooth.platform.lora import WEIGHTS_NAME

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def lora_run(tiny_path, tmp_path_factory) -> TrainingSummary:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    config = small_config(tmp_path_factory.mktemp("lora-runs"), "lora", **{
        "train.mode": "lora",
        "train.lora_rank": 4,
        "train.train_text_encoder": True,
        "train.max_steps": 6,
        "train.learning_rate": 1e-2,
        "train.checkpoint_every": 3,
        "scaling.num_workers": 1,
    })
    return run_training(config, progress=False)


def test_lora_run_trains_and_checkpoints_only_the_adapters(lora_run):
    assert lora_run.mode == "lora" and lora_run.steps == 6
    assert lora_run.model_path == lora_run.lora_path
    assert lora_run.class_image_set is None and lora_run.validation_images == []
    metrics = step_metrics(lora_run.run_dir)
    assert sorted(metrics) == list(range(1, 7)) and all(m["prior_loss"] == 0 for m in metrics.values())
    checkpoint = Path(lora_run.checkpoint)
    for part in ("unet", "text_encoder"):
        keys = load_file(checkpoint / f"{part}.safetensors").keys()
        assert keys and all(".lora_" in k for k in keys), part


def test_lora_export_is_a_diffusers_adapter_with_its_base_model(lora_run):
    lora = Path(lora_run.lora_path)
    weights = load_file(lora / WEIGHTS_NAME)
    assert any(k.startswith("unet.") for k in weights) and any(k.startswith("text_encoder.") for k in weights)
    meta = json.loads((lora / "raybooth_lora.json").read_text())
    assert meta["base_model"] == "tiny" and meta["base_revision"] and meta["step"] == 6
    assert any(float(w.abs().max()) > 0 for k, w in weights.items() if "lora_B" in k or "lora.up" in k)


def test_generate_and_inpaint_with_the_trained_adapter(lora_run, tmp_path):
    from raybooth.cli import main
    from raybooth.platform.generation import GenerationParams, InpaintParams
    from raybooth.platform.pipelines import DiffusionRunner

    out = tmp_path / "gen"
    args = ["generate", "--model", "tiny", "--prompt", "a photo of sks robot toy", "--seed", "5",
            "--steps", "2", "--out"]
    assert main([*args, str(out / "lora"), "--lora", str(lora_run.lora_path)]) == 0
    assert main([*args, str(out / "base")]) == 0
    with_lora = np.asarray(Image.open(next((out / "lora").glob("*.png"))))
    without = np.asarray(Image.open(next((out / "base").glob("*.png"))))
    assert with_lora.shape == (64, 64, 3) and not np.array_equal(with_lora, without)

    runner = DiffusionRunner("tiny")
    name = runner.load_lora(lora_run.lora_path)
    image = Image.new("RGB", (64, 64), (30, 90, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    result = runner.inpaint([image], [mask], ["a sks robot toy"], [1], InpaintParams(steps=2, lora=name))[0]
    outside = np.asarray(mask) == 0
    assert (np.asarray(result)[outside] == np.asarray(image)[outside]).all()
    assert runner.text_to_image(["a sks robot toy"], [1], GenerationParams(steps=2, lora=name))[0].size == (64, 64)
