"""What every Ray Train worker runs: DreamBooth fine-tuning, readable top to bottom.

The driver (raybooth.jobs.train.driver) hands `train_worker` a `WorkerJob` (raybooth.jobs.train.handoff,
as JSON): the validated config, the run directory, the instance and class image files, the
checkpoint to resume from (if any) and the MLflow run to log into. Each worker then

  1. sets up Accelerate (DDP wrapping, mixed precision, gradient accumulation) and seeds,
  2. loads the model: VAE frozen; UNet (and text encoder) trained fully or through LoRA adapters,
  3. decodes its images once and caches VAE latents and frozen prompt embeddings on the device,
  4. builds the optimizer and LR schedule, and restores a checkpoint when resuming,
  5. trains: every micro-step draws its samples and noise from (seed, rank, micro-step) alone,
  6. every `log_every` steps averages the losses over workers; rank 0 writes them to
     metrics.jsonl and MLflow; at validation steps rank 0 draws a grid of validation images,
  7. every `checkpoint_every` steps (and at the end) all workers report a checkpoint.

A loss that turns NaN or infinite ends the loop at the next sync (a `diverged` event in
metrics.jsonl, no checkpoint of the broken weights); the driver turns it into a user error.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from raybooth.jobs.train.checkpoints import (
    TrainingState,
    checkpoint_dir_name,
    load_checkpoint,
    load_checkpoint_or,
    restore_rng,
    write_checkpoint,
)
from raybooth.jobs.train.data import (
    CLASS_STREAM,
    INSTANCE_STREAM,
    NOISE_STREAM,
    ImageLatents,
    PromptEmbeddings,
    Stream,
    build_schedule,
    derive_seed,
    load_images,
)
from raybooth.jobs.train.handoff import WorkerJob
from raybooth.jobs.train.loss import dreambooth_loss, noisy_batch
from raybooth.jobs.train.metrics import METRIC_KEYS as METRIC_NAMES
from raybooth.jobs.train.metrics import DIVERGED_EVENT, MetricsLog
from raybooth.jobs.train.model import (
    MIXED_PRECISION_DTYPES,
    load_train_models,
    load_trainable_state,
    make_lr_scheduler,
    make_optimizer,
    trainable_state,
)
from raybooth.platform.config import TrainConfig
from raybooth.platform.devices import use_assigned_cpus
from raybooth.platform.models import resolve_model
from raybooth.platform.paths import replace_into, write_json_atomic

WORKERS_DIR = "workers"


def train_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    job = WorkerJob.from_json(loop_config)
    config = job.config
    t = config.train
    run_dir = job.run_dir
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    record_worker(run_dir, rank, world)

    # 1. Accelerate and seeds ------------------------------------------------------------------
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps
    )
    device = accelerator.device
    if device.type == "cpu":
        use_assigned_cpus()  # torch's threads = the CPUs this worker reserved (Ray says 1 otherwise)
    weight_dtype = MIXED_PRECISION_DTYPES[t.mixed_precision]
    set_seed(t.seed)  # the same on every rank: identical LoRA initialisation everywhere

    # 2. Model -----------------------------------------------------------------------------------
    resolved = resolve_model(config.model, config.model_options)
    models = load_train_models(config, resolved, device, weight_dtype)

    # 3. Data, decoded and encoded once --------------------------------------------------------
    with_prior = job.with_prior
    batch = t.batch_size
    micro_steps_total = t.max_steps * t.gradient_accumulation_steps
    instance = ImageLatents(
        load_images(list(job.instance_images.values()), t.resolution, "instance image",
                    names=list(job.instance_images)),
        t.resolution, t.center_crop, models.vae, device, cached=t.cache_latents,
    )
    instance_order = build_schedule(
        Stream(t.seed, INSTANCE_STREAM, len(instance.images)), micro_steps_total, rank, world, batch,
        t.random_flip, device,
    )
    if with_prior:
        classes = ImageLatents(
            load_images(job.class_images, t.resolution, "class image"),
            t.resolution, t.center_crop, models.vae, device, cached=t.cache_latents,
        )
        class_order = build_schedule(
            Stream(t.seed, CLASS_STREAM, len(classes.images)), micro_steps_total, rank, world, batch,
            t.random_flip, device,
        )
    text_frozen = "text_encoder" not in models.trainables
    prompts = PromptEmbeddings(
        models.tokenizer, models.text_encoder, [config.subject.instance_prompt, config.subject.class_prompt],
        device, frozen=text_frozen,
    )
    # Instance samples first, class samples second: the loss splits the batch in these halves.
    prompt_of_sample = torch.tensor([0] * batch + ([1] * batch if with_prior else []), device=device)

    # 4. Optimizer, schedule, resume -----------------------------------------------------------
    params = models.trainable_parameters()
    optimizer = make_optimizer(config, params)
    lr_scheduler = make_lr_scheduler(config, optimizer)
    state = resume_state(job, rank)
    start_step = 0
    if state is not None:
        for name, module in models.trainables.items():
            load_trainable_state(module, state.weights[name], name)
        optimizer.load_state_dict(state.optimizer)
        lr_scheduler.load_state_dict(state.lr_scheduler)
        start_step = state.step

    names = list(models.trainables)
    *wrapped_modules, optimizer = accelerator.prepare(*models.trainables.values(), optimizer)
    wrapped = dict(zip(names, wrapped_modules))
    unet = wrapped["unet"]
    text_encoder = wrapped.get("text_encoder", models.text_encoder)
    if state is not None:
        if state.grad_scaler is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state.grad_scaler)
        # Last, after everything above that may draw random numbers.
        if state.rng is not None and state.world_size == world:
            restore_rng(state.rng)

    log = MetricsLog(run_dir) if rank == 0 else None
    tracker = attach_tracker(job) if rank == 0 else None
    # evaluation.every: rank 0 judges the live model; the numbers ride on the checkpoint reports.
    from raybooth.jobs.evaluate.live import live_evaluator

    evaluator = live_evaluator(config, job.instance_images, device) if rank == 0 else None
    eval_metrics: dict[str, float] = {}
    if log is not None:
        if state is not None:
            log.event("resumed", step=start_step, checkpoint=str(state.directory), world_size=world,
                      same_world_size=state.world_size == world)
        log.event("started", step=start_step, world_size=world, pid=os.getpid())

    # 5. Train ---------------------------------------------------------------------------------
    window = LossWindow(t.log_every, device)
    window_started = time.perf_counter()
    images_per_step = batch * (2 if with_prior else 1) * world * t.gradient_accumulation_steps
    for step in range(start_step + 1, t.max_steps + 1):
        lr = lr_scheduler.get_last_lr()[0]
        for micro in range(t.gradient_accumulation_steps):
            micro_step = (step - 1) * t.gradient_accumulation_steps + micro
            generator = torch.Generator(device=device).manual_seed(
                derive_seed(t.seed, NOISE_STREAM, rank, micro_step)
            )
            with accelerator.accumulate(*wrapped.values()):
                latents = instance.latents(instance_order, micro_step, generator)
                if with_prior:
                    latents = torch.cat([latents, classes.latents(class_order, micro_step, generator)])
                noisy = noisy_batch(latents, models.noise_scheduler, generator, t.noise_offset)
                with accelerator.autocast():
                    hidden = prompts.hidden_states(prompt_of_sample, text_encoder)
                    pred = unet(noisy.noisy, noisy.timesteps, hidden, return_dict=False)[0]
                parts = dreambooth_loss(
                    pred, noisy, models.noise_scheduler, with_prior=with_prior,
                    prior_loss_weight=t.prior_loss_weight, snr_gamma=t.snr_gamma,
                )
                accelerator.backward(parts.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not optimizer.step_was_skipped:
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.add(parts, t.gradient_accumulation_steps)
        window.end_step(step, lr)

        # 6. Metrics and validation --------------------------------------------------------------
        checkpoint_due = step % t.checkpoint_every == 0 or step == t.max_steps
        validation_due = bool(t.validation_prompts) and (
            (t.validation_every and step % t.validation_every == 0) or step == t.max_steps
        )
        if step % t.log_every == 0 or checkpoint_due or validation_due:
            losses = accelerator.reduce(window.values(), reduction="mean").tolist()  # the one sync
            elapsed = time.perf_counter() - window_started
            steps_per_second = len(losses) / elapsed if elapsed > 0 else 0.0
            records = [
                {
                    "step": s, "loss": loss, "instance_loss": inst, "prior_loss": prior, "lr": rate,
                    "steps_per_second": steps_per_second,
                    "samples_per_second": steps_per_second * images_per_step,
                    "peak_memory_mb": peak_memory_mb(device), "time": time.time(),
                }
                for s, rate, (loss, inst, prior) in zip(window.steps, window.lrs, losses)
            ]
            if log is not None:
                log.write(records)
            if tracker is not None:
                for r in records:
                    tracker.log_metrics({k: float(r[k]) for k in METRIC_NAMES}, step=r["step"])
            diverged = first_non_finite(records)
            if diverged is not None:
                # Every rank sees the same reduced losses, so all stop here together. Stopping
                # (not raising) keeps Ray Train from retrying: a restart from the last checkpoint
                # would diverge again at the same step. The driver reads the event and explains.
                if log is not None:
                    log.event(DIVERGED_EVENT, step=diverged["step"], loss=diverged["loss"], lr=diverged["lr"])
                if tracker is not None:
                    tracker.flush()
                return
            if rank == 0 and validation_due:
                run_validation(config, models, accelerator, run_dir, step, device, weight_dtype, tracker)
            if evaluator is not None and step % evaluator.every == 0:
                eval_metrics = evaluator.evaluate(
                    accelerator.unwrap_model(models.unet), models.vae, accelerator.unwrap_model(models.text_encoder),
                    models.tokenizer, models.noise_scheduler.config,
                    weight_dtype if t.mixed_precision != "no" else None,
                )
                if tracker is not None:
                    tracker.log_metrics(eval_metrics, step=step)
            window.reset()
            window_started = time.perf_counter()
            last = records[-1]

        # 7. Checkpoint ------------------------------------------------------------------------
        if checkpoint_due:
            report_checkpoint(
                accelerator, wrapped, optimizer, lr_scheduler, rank=rank, world=world, step=step,
                micro_step=step * t.gradient_accumulation_steps,
                metrics={**{k: last[k] for k in ("step", *METRIC_NAMES)}, **eval_metrics},
                meta={"mode": t.mode, "train_text_encoder": t.train_text_encoder, "lora_rank": t.lora_rank,
                      "model": config.model, "seed": t.seed, "run_name": config.run.name},
            )

    if tracker is not None:
        tracker.flush()
    if log is not None:
        log.event("finished", step=t.max_steps)


def first_non_finite(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first step whose loss is NaN or infinite (the run has diverged), or None."""
    for r in records:
        if not all(math.isfinite(r[k]) for k in ("loss", "instance_loss", "prior_loss")):
            return r
    return None


class LossWindow:
    """Per-step losses kept on the device between flushes, so a step never waits for the host."""

    def __init__(self, size: int, device: torch.device):
        self.buffer = torch.zeros((size + 1, 3), device=device)
        self.current = torch.zeros(3, device=device)
        self.steps: list[int] = []
        self.lrs: list[float] = []

    def add(self, parts, accumulation: int) -> None:
        self.current += torch.stack([parts.loss.detach(), parts.instance, parts.prior]).float() / accumulation

    def end_step(self, step: int, lr: float) -> None:
        if len(self.steps) == self.buffer.shape[0]:
            self.buffer = torch.cat([self.buffer, torch.zeros_like(self.buffer)])
        self.buffer[len(self.steps)] = self.current
        self.current.zero_()
        self.steps.append(step)
        self.lrs.append(lr)

    def values(self) -> torch.Tensor:
        return self.buffer[: len(self.steps)].clone()

    def reset(self) -> None:
        self.steps.clear()
        self.lrs.clear()


def resume_state(job: WorkerJob, rank: int) -> TrainingState | None:
    """The checkpoint to continue from: Ray's latest of this run (after a worker failure, or when
    the run folder already has checkpoints), else the one `run.resume_from` named."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            # A truncated latest checkpoint: the previous complete one the driver chose instead.
            return load_checkpoint_or(directory, job.resume_path, rank)
    if job.resume_path is not None:
        return load_checkpoint(job.resume_path, rank)
    return None


def report_checkpoint(accelerator, wrapped: dict[str, Any], optimizer, lr_scheduler, *, rank: int,
                      world: int, step: int, micro_step: int, metrics: dict[str, Any],
                      meta: dict[str, Any]) -> None:
    """Every worker writes its part into a fresh local folder and reports it; Ray Train merges the
    parts into <run_dir>/checkpoint-<step> and keeps the last `keep_checkpoints`."""
    import ray.train
    from ray.train import Checkpoint

    scratch = Path(tempfile.mkdtemp(prefix=f"raybooth-ckpt-{step}-"))
    try:
        write_checkpoint(
            scratch, rank=rank, world_size=world, step=step, micro_step=micro_step,
            weights={n: trainable_state(accelerator.unwrap_model(m)) for n, m in wrapped.items()} if rank == 0 else None,
            optimizer=optimizer.state_dict() if rank == 0 else None,
            lr_scheduler=lr_scheduler.state_dict() if rank == 0 else None,
            grad_scaler=accelerator.scaler.state_dict() if rank == 0 and accelerator.scaler is not None else None,
            meta=meta,
        )
        ray.train.report(
            metrics if rank == 0 else {"step": step},
            checkpoint=Checkpoint.from_directory(str(scratch)),
            checkpoint_dir_name=checkpoint_dir_name(step),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_validation(config: TrainConfig, models, accelerator, run_dir: Path, step: int,
                   device: torch.device, weight_dtype: torch.dtype, tracker) -> None:
    from raybooth.jobs.train.validation import grid_path, validation_grid

    t = config.train
    grid = validation_grid(
        accelerator.unwrap_model(models.unet), models.vae, accelerator.unwrap_model(models.text_encoder),
        models.tokenizer, models.noise_scheduler.config, t.validation_prompts, t.seed, t.resolution,
        t.validation_steps, device, weight_dtype if t.mixed_precision != "no" else None,
        models.generation_defaults,
    )
    path = grid_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_into(path, grid.save)
    if tracker is not None:
        tracker.log_image(grid, f"validation/step-{step:06d}.png")


def attach_tracker(job: WorkerJob):
    """The MLflow run the driver created, or None (tracking off: MLflow is not imported)."""
    if not job.mlflow_run_id:
        return None
    from raybooth.platform.mlflow.runs import RunTracker

    return RunTracker.attach(job.mlflow_tracking_uri, job.mlflow_run_id)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def record_worker(run_dir: Path, rank: int, world: int) -> None:
    """<run_dir>/workers/rank-<r>.json: which process and node runs each rank (for operators,
    and for the tests that kill a worker)."""
    import ray

    directory = run_dir / WORKERS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank-{rank}.json"
    info = {
        "rank": rank, "world_size": world, "pid": os.getpid(), "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(), "started": time.time(),
        "torch_threads": torch.get_num_threads(),
    }
    write_json_atomic(path, info, indent=None)
