"""`raybooth train`: DreamBooth fine-tuning on Ray Train, from the driver's side.

    from raybooth.jobs.train.driver import run_training
    summary = run_training(config)      # a TrainingSummary, also <run.storage_path>/<run.name>/summary.json

The driver stays short; the work happens in the Ray Train workers (raybooth.jobs.train.loop):

    check inputs (raybooth.jobs.train.inputs)    before any worker or GPU is taken
    -> class images (raybooth.jobs.priors.job)         when priors.enabled
    -> MLflow run (raybooth.jobs.train.tracking)     when tracking.enabled
    -> TorchTrainer(train_worker, ScalingConfig, RunConfig(storage_path, CheckpointConfig, FailureConfig)).fit()
       with a WorkerJob (raybooth.jobs.train.handoff) as the workers' config
    -> export the last checkpoint (raybooth.jobs.train.export) -> an Export
    -> register it in MLflow (raybooth.jobs.train.register) when tracking.register_as is set
    -> summary.json (a TrainingSummary)

A worker that dies is restarted by Ray Train from the last checkpoint (`run.max_failures` times);
a run that stopped continues with `run.resume_from: latest` (or a checkpoint folder).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from raybooth.jobs.train.checkpoints import read_state
from raybooth.jobs.train.handoff import TrainingSummary, WorkerJob
from raybooth.jobs.train.inputs import (
    TrainInputs,
    check_inputs,
    check_placement,
    check_resume,
    worker_resources,
)
from raybooth.jobs.train.metrics import ProgressPrinter, divergence, step_metrics
from raybooth.platform.config import TrainConfig, add_config_arguments
from raybooth.platform.errors import UserError, find_user_error

log = logging.getLogger("raybooth.train")

SUMMARY_FILE = "summary.json"


class TrainingFailed(RuntimeError):
    """Training stopped after its retries; the run directory keeps its checkpoints."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: a setting (most often the learning rate) to change."""

    def __init__(self, config: TrainConfig, run_dir: Path, event: dict[str, Any]):
        t = config.train
        super().__init__(
            f"training diverged: the loss was {event['loss']} at step {event['step']} "
            f"(train.learning_rate {t.learning_rate:g}, train.mixed_precision '{t.mixed_precision}'). "
            "Lower train.learning_rate (with fp16, also try bf16 or 'no') and train again; "
            f"the checkpoints from before it are kept in {run_dir}",
            field="train.learning_rate",
        )
        self.step = int(event["step"])


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS (a cluster, `ray job submit`, a RayJob) is honoured; otherwise a local Ray.
        ray.init()


def _class_images(config: TrainConfig, progress: bool):
    if not config.priors.enabled:
        return None
    from raybooth.jobs.priors.job import ensure_class_images

    class_set = ensure_class_images(config, progress=progress)
    # Absolute: a worker's working directory is not the driver's.
    class_set.images = [Path(p).resolve() for p in class_set.images]
    missing = [p for p in class_set.images if not p.is_file()]
    if missing:
        raise UserError(
            f"class images at {class_set.uri} are not on a filesystem this machine can read (e.g. "
            f"{missing[0]}); training reads them from a path every node sees: set "
            "priors.class_data_dir to a shared folder (NFS) rather than object storage",
            field="priors.class_data_dir",
        )
    return class_set


def _tracker(config: TrainConfig, run_dir: Path):
    if not config.tracking.enabled:
        return None
    from raybooth.jobs.train.tracking import start_training_run

    tracker = start_training_run(config, run_dir)
    return tracker if tracker.run_id else None


def worker_config(config: TrainConfig, inputs: TrainInputs) -> TrainConfig:
    """The config as the workers get it: a local model directory made absolute (a worker's
    working directory is not the driver's)."""
    if inputs.resolved.kind == "local":
        return config.model_copy(update={"model": str(inputs.resolved.path)})
    return config


def _unwrap_user_error(exc: BaseException) -> UserError | None:
    """A UserError raised inside a worker (e.g. 8-bit Adam without bitsandbytes), if that is why."""
    for failure in (getattr(exc, "worker_failures", None) or {}).values():
        found = find_user_error(failure)
        if found is not None:
            return found
    return None


def _fit(config: TrainConfig, inputs: TrainInputs, job: WorkerJob, resources: dict[str, float],
         progress: bool, callbacks: list | None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raybooth.jobs.train.loop import train_worker

    s = config.scaling
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job.to_json(),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=str(inputs.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            callbacks=callbacks,
        ),
    )
    printer = ProgressPrinter(inputs.run_dir, config.train.max_steps) if progress else contextlib.nullcontext()
    with printer:
        return trainer.fit()


def run_training(config: TrainConfig, *, progress: bool = True, callbacks: list | None = None) -> TrainingSummary:
    """Train, export and (with tracking) register; returns the summary written to summary.json.

    `callbacks` go into Ray Train's RunConfig (e.g. Ray Tune's TuneReportCallback, which then sees
    the metrics reported with every checkpoint: loss, instance_loss, prior_loss, lr, ...).
    """
    started = time.perf_counter()
    inputs = check_inputs(config)
    if config.evaluation is not None:
        from raybooth.jobs.evaluate.training import check_training_evaluation

        check_training_evaluation(config)  # a bad evaluation: section fails before training
    resume = check_resume(config, inputs)
    _ensure_ray()
    resources = worker_resources(config)
    check_placement(config, resources)
    defaulted = "" if config.scaling.resources_per_worker or config.scaling.use_gpu else (
        " (raybooth's default: an equal share of this machine's free CPUs, 1 on a multi-node "
        "cluster; set scaling.resources_per_worker to choose)")
    print(f"training: {config.scaling.num_workers} worker(s) x {resources}{defaulted}", flush=True)
    class_set = _class_images(config, progress)
    tracker = _tracker(config, inputs.run_dir)
    if tracker is not None and class_set is not None:
        tracker.set_tags({"raybooth.class_image_set": class_set.identity})

    from raybooth.jobs.train.export import export_checkpoint

    t = config.train
    resume_step = int(read_state(resume)["step"]) if resume else 0
    train_s = 0.0
    try:
        if resume is not None and resume_step >= t.max_steps:
            # Nothing left to train (a finished run resumed as is): export what is there.
            print(f"training: {resume} is at step {resume_step} >= train.max_steps; exporting it")
            final_checkpoint = resume
        else:
            job = WorkerJob(
                config=worker_config(config, inputs),
                run_dir=inputs.run_dir,
                instance_images={str(p): p.read_bytes() for p in inputs.instance_images},
                class_images=list(class_set.images) if class_set else None,
                resume_path=resume,
                mlflow_run_id=tracker.run_id if tracker else None,
                mlflow_tracking_uri=tracker.tracking_uri if tracker else None,
            )
            t0 = time.perf_counter()
            try:
                result = _fit(config, inputs, job, resources, progress, callbacks)
            except Exception as exc:
                from ray.train import TrainingFailedError

                if not isinstance(exc, TrainingFailedError):
                    raise
                user_error = _unwrap_user_error(exc)
                if user_error is not None:
                    raise user_error from None
                raise TrainingFailed(
                    f"training failed after {config.run.max_failures} restart(s): {exc}. The "
                    f"checkpoints in {inputs.run_dir} are kept; continue with --set "
                    "run.resume_from=latest once the cause is fixed"
                ) from exc
            train_s = time.perf_counter() - t0
            diverged = divergence(inputs.run_dir)
            if diverged is not None:
                raise TrainingDiverged(config, inputs.run_dir, diverged)
            if result.checkpoint is None:
                raise TrainingFailed(f"training finished without a checkpoint in {inputs.run_dir}")
            final_checkpoint = Path(result.checkpoint.path)

        exported = export_checkpoint(config, inputs.resolved, final_checkpoint, inputs.run_dir)
        metrics = step_metrics(inputs.run_dir)
        # The run directory's own log has every step, even when the store missed some.
        last = metrics.get(exported.step, {})
        summary = TrainingSummary(
            run_dir=inputs.run_dir,
            export=exported,
            final_loss=last.get("loss"),
            final_metrics={k: v for k, v in last.items() if k not in ("step", "time")},
            checkpoint=final_checkpoint,
            resumed_from=resume,
            num_workers=config.scaling.num_workers,
            class_image_set=class_set.identity if class_set else None,
            class_images_dir=Path(class_set.directory) if class_set else None,
            validation_images=sorted((inputs.run_dir / "validation").glob("step-*.png")),
            mlflow_run_id=tracker.run_id if tracker else None,
            registration=None,
            train_seconds=round(train_s, 2),
        )
        if tracker is not None:
            # What the rank-0 worker logged locally but could not deliver (store away at the end,
            # worker killed): the tracker skips what the run already has.
            tracker.backfill(metrics, {f"validation/{p.name}": p for p in summary.validation_images})
        if tracker is not None and config.tracking.register_as:
            from raybooth.jobs.train.register import register_training

            tracker.flush()
            summary = dataclasses.replace(summary, registration=register_training(config, summary))
        if config.evaluation is not None:
            from raybooth.jobs.evaluate.training import evaluate_training

            # The exported model judged; metrics to this run, tags to the registered version.
            evaluate_training(config, summary, tracker, progress=progress)
        summary = dataclasses.replace(summary, total_seconds=round(time.perf_counter() - started, 2))
        path = inputs.run_dir / SUMMARY_FILE
        summary.write(path)
        if tracker is not None:
            tracker.set_tags({"raybooth.summary": str(path), "raybooth.model_path": str(summary.model_path)})
            tracker.end("FINISHED")
        return summary
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise


# ---------------------------------------------------------------------------------------------
# `raybooth train`


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="DreamBooth fine-tuning on Ray Train (full or LoRA), with checkpoints and resume",
        description="Validate the inputs, make the class images (priors.enabled), train on "
        "scaling.num_workers Ray Train workers, export the model and write summary.json in "
        "<run.storage_path>/<run.name>/. On a cluster: ray job submit --working-dir . -- "
        "raybooth train --config configs/train/sd15.yaml",
    )
    add_config_arguments(p, "a training config (configs/train/*.yaml)",
                         "train.max_steps=400 --set run.resume_from=latest")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress lines")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from raybooth.platform.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, args.overrides)
    summary = run_training(config, progress=not args.no_progress)
    loss = "n/a" if summary.final_loss is None else format(summary.final_loss, ".4f")
    print(f"trained {summary.steps} steps ({summary.mode}), final loss {loss}")
    print(f"model: {summary.model_path}")
    registration = summary.registration
    if registration is not None and registration.registered_model:
        print(f"registered: {registration.model_uri} (version {registration.registered_version})")
    print(summary.run_dir / SUMMARY_FILE)
    return 0
