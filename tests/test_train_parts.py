"""The parts of training that need no Ray Train run: data order, transforms, latent caching, the
loss, checkpoints and RNG states, and the driver-side checks that stop a bad run before any
worker starts."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raybooth.jobs.train.checkpoints import (
    capture_rng,
    find_checkpoints,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    write_checkpoint,
)
from raybooth.jobs.train.data import (
    INSTANCE_STREAM,
    ImageLatents,
    Stream,
    build_schedule,
    crop_square,
    load_images,
    resize_shorter_side,
    to_tensor,
    worker_positions,
)
from raybooth.jobs.train.inputs import check_inputs, check_placement, check_resume
from raybooth.jobs.train.loss import dreambooth_loss, noisy_batch
from raybooth.platform.config import TrainConfig, load_config, with_overrides
from raybooth.platform.errors import ConfigError, ImageError

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "examples" / "demo-subject"


def config_for(tmp_path: Path, **values) -> TrainConfig:
    base = {
        "subject.instance_data_dir": str(SUBJECT),
        "run.storage_path": str(tmp_path / "runs"),
        "tracking.enabled": False,
        "priors.enabled": False,
        "scaling.num_workers": 1,
    }
    return with_overrides(TrainConfig(), {**base, **values})


# ------------------------------------------------------------------------------ data order


def test_each_epoch_visits_every_image_once_and_order_depends_only_on_seed_and_position():
    stream = Stream(seed=7, stream=INSTANCE_STREAM, size=5)
    index, flip, crop = stream.draw(np.arange(20))
    for epoch in range(4):
        assert sorted(index[epoch * 5 : epoch * 5 + 5]) == [0, 1, 2, 3, 4]
    # Any subset of positions, drawn in any order, gives the same samples (no iterator state).
    again, flip2, crop2 = stream.draw(np.array([17, 3, 9]))
    assert list(again) == [index[17], index[3], index[9]]
    assert list(flip2) == [flip[17], flip[3], flip[9]]
    assert np.array_equal(crop2, crop[[17, 3, 9]])
    assert not np.array_equal(Stream(8, INSTANCE_STREAM, 5).draw(np.arange(20))[0], index)


def test_workers_take_disjoint_positions_that_tile_the_stream():
    micro = np.arange(6)
    world, batch = 3, 2
    taken = np.concatenate([worker_positions(micro, r, world, batch).ravel() for r in range(world)])
    assert sorted(taken) == list(range(6 * world * batch))


def test_a_longer_schedule_starts_with_the_shorter_one():
    """Resuming with a larger train.max_steps must not change the samples of earlier steps."""
    stream = Stream(seed=1, stream=INSTANCE_STREAM, size=5)
    short = build_schedule(stream, 8, rank=1, world=2, batch=2, random_flip=True, device=torch.device("cpu"))
    long = build_schedule(stream, 20, rank=1, world=2, batch=2, random_flip=True, device=torch.device("cpu"))
    assert torch.equal(long.index[:8], short.index) and torch.equal(long.flip[:8], short.flip)
    no_flip = build_schedule(stream, 8, rank=1, world=2, batch=2, random_flip=False, device=torch.device("cpu"))
    assert int(no_flip.flip.sum()) == 0 and int(short.flip.sum()) > 0


# ------------------------------------------------------------------------------ transforms


def test_transforms_resize_crop_and_scale_without_torchvision():
    img = Image.new("RGB", (120, 80), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 80))  # a blue band on the left
    resized = resize_shorter_side(img, 64)
    assert min(resized.size) == 64 and resized.size == (96, 64)
    centre = crop_square(resized, 64)
    left = crop_square(resized, 64, fx=0.0)
    assert centre.size == left.size == (64, 64)
    assert left.getpixel((0, 32))[2] > 200 and centre.getpixel((0, 32))[0] > 200
    t = to_tensor(centre)
    assert t.shape == (3, 64, 64) and t.dtype == torch.float32
    assert t.min() >= -1.0 and t.max() <= 1.0 and torch.isclose(t[0].max(), torch.tensor(1.0))


def test_cached_latents_equal_latents_encoded_every_step(tiny_path):
    """The cache is an optimisation only: both paths give the same latents for the same step."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_path, subfolder="vae").eval()
    images = load_images(sorted(SUBJECT.glob("*.png")), 64, "instance image")
    cpu = torch.device("cpu")
    cached = ImageLatents(images, 64, True, vae, cpu, cached=True)
    direct = ImageLatents(images, 64, True, vae, cpu, cached=False)
    assert cached.mean.shape == (len(images), 2, 4, 32, 32)  # plain and mirrored
    schedule = build_schedule(Stream(0, INSTANCE_STREAM, len(images)), 4, 0, 1, 2, True, cpu)
    for step in range(4):
        a = cached.latents(schedule, step, torch.Generator().manual_seed(step))
        b = direct.latents(schedule, step, torch.Generator().manual_seed(step))
        assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------ loss


def test_prior_preservation_loss_is_instance_plus_weighted_class_mse():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = noisy_batch(latents, sched, torch.Generator().manual_seed(1), noise_offset=0.1)
    pred = torch.randn_like(latents)
    parts = dreambooth_loss(pred, batch, sched, with_prior=True, prior_loss_weight=0.5, snr_gamma=None)
    inst = torch.nn.functional.mse_loss(pred[:2], batch.target[:2])
    prior = torch.nn.functional.mse_loss(pred[2:], batch.target[2:])
    assert torch.isclose(parts.instance, inst) and torch.isclose(parts.prior, prior)
    assert torch.isclose(parts.loss, inst + 0.5 * prior)
    # Same generator seed, same noise and timesteps: a step is a function of its seed.
    again = noisy_batch(latents, sched, torch.Generator().manual_seed(1), noise_offset=0.1)
    assert torch.equal(again.noisy, batch.noisy) and torch.equal(again.timesteps, batch.timesteps)
    # Min-SNR weighting: low-noise instance samples (SNR above gamma) weigh less; priors unchanged.
    from raybooth.jobs.train.loss import NoisyBatch

    low_noise = NoisyBatch(noisy=batch.noisy, target=batch.target, timesteps=torch.tensor([10, 20, 900, 950]))
    snr = dreambooth_loss(pred, low_noise, sched, with_prior=True, prior_loss_weight=0.5, snr_gamma=5.0)
    assert torch.isclose(snr.prior, prior) and snr.instance < inst


def test_v_prediction_target_is_the_velocity():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    latents = torch.randn(2, 4, 8, 8)
    batch = noisy_batch(latents, sched, torch.Generator().manual_seed(3))
    noise = torch.randn(latents.shape, generator=_after_timesteps(3, 2))
    assert torch.allclose(batch.target, sched.get_velocity(latents, noise, batch.timesteps))


def _after_timesteps(seed: int, n: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, 1000, (n,), generator=g)
    return g


# ------------------------------------------------------------------------------ checkpoints


def test_rng_states_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def _write_full(directory: Path, step: int, world: int = 2) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    for rank in range(world):
        write_checkpoint(
            directory, rank=rank, world_size=world, step=step, micro_step=step * 2,
            weights={"unet": {k: v.detach().clone() for k, v in model.state_dict().items()}} if rank == 0 else None,
            optimizer=opt.state_dict() if rank == 0 else None,
            lr_scheduler={"last_epoch": step} if rank == 0 else None,
            meta={"mode": "full"},
        )


def test_checkpoint_round_trip_and_incomplete_checkpoints_are_skipped(tmp_path):
    run = tmp_path / "run"
    _write_full(run / "checkpoint-000004", 4)
    _write_full(run / "checkpoint-000008", 8)
    state = load_checkpoint(run / "checkpoint-000008", rank=1)
    assert (state.step, state.micro_step, state.world_size) == (8, 16, 2)
    assert set(state.weights["unet"]) == {"weight", "bias"}
    assert state.optimizer["state"][0]["step"] == 1 and state.rng is not None
    assert (run / "checkpoint-000008" / "unet.safetensors").is_file()  # weights as safetensors
    # A checkpoint missing one worker's RNG file is not resumable, and `latest` skips it.
    (run / "checkpoint-000008" / "rng-rank1.pt").unlink()
    assert not is_complete(run / "checkpoint-000008")
    assert [s for s, _ in find_checkpoints(run)] == [4]
    assert latest_checkpoint(run) == run / "checkpoint-000004"
    with pytest.raises(ConfigError, match="not a complete"):
        load_checkpoint(run / "checkpoint-000008")


# ------------------------------------------------------------------------------ driver checks


def test_a_bad_instance_image_is_named_before_training(tmp_path):
    folder = tmp_path / "subject"
    shutil.copytree(SUBJECT, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError) as err:
        check_inputs(config_for(tmp_path, **{"subject.instance_data_dir": str(folder)}))
    assert "broken.png" in err.value.message and "robot-0.png" not in err.value.message


def test_an_empty_instance_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no images"):
        check_inputs(config_for(tmp_path, **{"subject.instance_data_dir": str(tmp_path / "empty")}))


def test_prompt_without_identifier_and_bad_resolution_are_config_errors():
    with pytest.raises(ConfigError, match="identifier"):
        load_config(None, ["subject.instance_prompt=a photo of a robot"])
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(None, ["train.resolution=60"])


def test_gpu_only_options_are_refused_on_cpu_workers(tmp_path):
    with pytest.raises(ConfigError, match="use_8bit_adam"):
        check_inputs(config_for(tmp_path, **{"train.use_8bit_adam": True}))
    with pytest.raises(ConfigError, match="fp16"):
        check_inputs(config_for(tmp_path, **{"train.mixed_precision": "fp16"}))


def test_more_workers_than_the_cluster_can_place_is_an_error_not_a_hang(ray_local, tmp_path):
    from raybooth.jobs.train.driver import run_training

    config = config_for(tmp_path, **{"scaling.num_workers": 9})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="scaling.num_workers=9") as err:
        run_training(config, progress=False)
    assert time.perf_counter() - t0 < 60
    assert "fits 4" in err.value.message
    with pytest.raises(ConfigError, match="GPU"):
        check_placement(config_for(tmp_path, **{"scaling.use_gpu": True}))
    check_placement(config_for(tmp_path, **{"scaling.num_workers": 2}))  # fits: no error
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_default_worker_cpus_never_add_up_to_more_than_the_machine_has(ray_local, tmp_path):
    """The shared test Ray declares 4 logical CPUs on this machine; the default share of a
    worker follows the cores, not the declaration (more threads than cores wait on each other)."""
    from raybooth.jobs.train.inputs import worker_resources
    from raybooth.platform.devices import free_cpus, machine_cores

    cores, declared = machine_cores(), ray_local.available_resources()["CPU"]
    assert free_cpus() == min(declared, cores)
    for workers in (1, 2, 3):
        share = worker_resources(config_for(tmp_path, **{"scaling.num_workers": workers}))["CPU"]
        assert share == max(1, int(min(declared, cores) // workers)), (workers, share)
        assert share * workers <= max(cores, workers)  # at least 1 each, else within the cores
    # What is set explicitly is what a worker gets.
    explicit = config_for(tmp_path, **{"scaling.num_workers": 2, "scaling.resources_per_worker": {"CPU": 3}})
    assert worker_resources(explicit) == {"CPU": 3.0}


def test_existing_checkpoints_need_an_explicit_resume(tmp_path):
    config = config_for(tmp_path, **{"run.name": "r"})
    inputs = check_inputs(config)
    _write_full(inputs.run_dir / "checkpoint-000004", 4, world=1)
    with pytest.raises(ConfigError, match="resume_from=latest"):
        check_resume(config, inputs)
    latest = with_overrides(config, {"run.resume_from": "latest"})
    assert check_resume(latest, inputs) == inputs.run_dir / "checkpoint-000004"
    with pytest.raises(ConfigError, match="train.mode"):
        check_resume(with_overrides(latest, {"train.mode": "lora"}), inputs)
    elsewhere = with_overrides(config, {"run.name": "other", "run.resume_from": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="not a complete"):
        check_resume(elsewhere, check_inputs(elsewhere))


def test_divergence_is_read_from_the_latest_attempt_and_its_error_survives_pickling(tmp_path):
    """The worker's `diverged` event is what the driver turns into the user error; the error
    then crosses Ray's process boundaries (a Tune trial) by pickle, with its message and field."""
    import pickle

    from raybooth.jobs.train.driver import TrainingDiverged
    from raybooth.jobs.train.loop import first_non_finite
    from raybooth.jobs.train.metrics import MetricsLog, divergence
    from raybooth.platform.config import TrainConfig
    from raybooth.platform.errors import find_user_error

    rows = [{"step": 1, "loss": 1.0, "instance_loss": 0.5, "prior_loss": 0.5},
            {"step": 2, "loss": float("nan"), "instance_loss": float("nan"), "prior_loss": 0.1}]
    assert first_non_finite(rows[:1]) is None and first_non_finite(rows)["step"] == 2
    assert first_non_finite([{**rows[0], "prior_loss": float("inf")}])["step"] == 1

    log = MetricsLog(tmp_path)
    log.event("started", step=0)
    assert divergence(tmp_path) is None
    log.event("diverged", step=2, loss=float("nan"), lr=50.0)
    event = divergence(tmp_path)
    assert event["step"] == 2
    error = TrainingDiverged(TrainConfig(), tmp_path, event)
    assert "at step 2" in error.message and error.field == "train.learning_rate"
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is TrainingDiverged and again.message == error.message
    assert again.field == error.field and again.step == 2
    wrapped = RuntimeError("trial failed")
    wrapped.__cause__ = again
    assert find_user_error(wrapped) is again
    log.event("resumed", step=0)  # a later attempt that has not diverged (yet)
    assert divergence(tmp_path) is None
