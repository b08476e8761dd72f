"""Driver-side checks of a training run, before any Ray Train worker (or GPU) is taken.

Each failure is a UserError that names the field or file and says what to do: an instance image
that does not decode, an empty folder, a model that cannot be resolved, options the hardware
cannot do, more workers than the cluster can place (an error rather than a run that waits
forever), and a run folder that already holds checkpoints when no resume was asked for (so
nothing done is lost by accident). Rules that need no files (the identifier in the prompt, the
resolution) are the config schema's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raybooth.jobs.train.checkpoints import checkpoint_problem, find_checkpoints, latest_resumable, read_state
from raybooth.platform.config import TrainConfig, with_overrides
from raybooth.platform.encoders_tiny import TINY_ENCODER_NAMES
from raybooth.platform.errors import ConfigError, ImageError
from raybooth.platform.images import list_images, open_image
from raybooth.platform.mlflow.refs import MODELS_PREFIX
from raybooth.platform.models import ResolvedModel, resolve_model
from raybooth.platform.tiny import TINY_NAMES
from raybooth.platform.toy.models import TOY_NAMES


log = logging.getLogger("raybooth.train")


@dataclass
class TrainInputs:
    storage_path: Path
    run_dir: Path
    instance_images: list[Path]
    resolved: ResolvedModel


def _local_relative(value: str | None) -> bool:
    return bool(value) and "://" not in value and not Path(value).expanduser().is_absolute()


def with_absolute_paths(config: TrainConfig, cwd: Path | None = None) -> TrainConfig:
    """The config with its relative local paths made absolute against `cwd` (the driver's
    working directory), for processes that run elsewhere: a Ray Tune trial runs in its own trial
    folder, where `examples/toy-subject` means nothing. Storage URIs (s3://...), Hub ids and the
    built-in model names stay as they are; `model` and the encoders only when such a folder exists
    (a built-in name or a registry reference wins over a folder of that name, as in resolve_model)."""
    base = (cwd or Path.cwd()).resolve()
    changes: dict[str, Any] = {}

    def absolute(value: str) -> str:
        return str((base / Path(value).expanduser()).resolve())

    for key, value in (("subject.instance_data_dir", config.subject.instance_data_dir),
                       ("priors.class_data_dir", config.priors.class_data_dir),
                       ("run.storage_path", config.run.storage_path),
                       ("model_options.cache_dir", config.model_options.cache_dir)):
        if _local_relative(value):
            changes[key] = absolute(value)
    if config.run.resume_from not in (None, "latest") and _local_relative(config.run.resume_from):
        changes["run.resume_from"] = absolute(config.run.resume_from)
    folders = [("model", config.model)]
    if config.evaluation is not None:
        folders += [("evaluation.dino_encoder", config.evaluation.dino_encoder),
                    ("evaluation.clip_encoder", config.evaluation.clip_encoder)]
    builtin = {*TINY_NAMES, *TOY_NAMES, *TINY_ENCODER_NAMES}
    for key, value in folders:
        if value in builtin or value.startswith(MODELS_PREFIX):
            continue
        if _local_relative(value) and (base / value).is_dir():
            changes[key] = absolute(value)
    return with_overrides(config, changes) if changes else config


def run_directory(config: TrainConfig) -> tuple[Path, Path]:
    """(absolute storage path, run directory = storage/name). Ray Train needs absolute paths."""
    storage = Path(config.run.storage_path).expanduser().resolve()
    return storage, storage / config.run.name


def check_instance_images(config: TrainConfig) -> list[Path]:
    folder = Path(config.subject.instance_data_dir).expanduser().resolve()
    paths = list_images(folder, "subject.instance_data_dir")
    bad = []
    for path in paths:
        try:
            open_image(path, name=str(path))
        except ImageError as exc:
            bad.append(exc.message)
    if bad:
        raise ImageError(
            f"subject.instance_data_dir: {len(bad)} of {len(paths)} instance image(s) cannot be "
            f"used: {'; '.join(bad)}. Fix or remove them.",
            field="subject.instance_data_dir",
        )
    return paths


def check_inputs(config: TrainConfig) -> TrainInputs:
    s, t = config.subject, config.train
    # The identifier-in-prompt and resolution rules live in the schema (platform.config), which
    # already ran when the config was loaded; what is checked here needs files, models or Ray.
    if config.priors.enabled and not s.class_prompt.strip():
        raise ConfigError("subject.class_prompt is empty but priors.enabled is true", field="subject.class_prompt")
    if t.mixed_precision == "fp16" and not config.scaling.use_gpu:
        raise ConfigError(
            "train.mixed_precision=fp16 needs GPUs (scaling.use_gpu=true); on CPUs use 'bf16' or 'no'",
            field="train.mixed_precision",
        )
    if t.use_8bit_adam and not config.scaling.use_gpu:
        raise ConfigError(
            "train.use_8bit_adam needs GPUs (bitsandbytes' 8-bit AdamW is CUDA-only): set "
            "scaling.use_gpu=true, or train.use_8bit_adam=false",
            field="train.use_8bit_adam",
        )
    if t.use_8bit_adam:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "train.use_8bit_adam needs bitsandbytes: pip install 'raybooth[gpu]' (on every "
                "node), or set train.use_8bit_adam=false",
                field="train.use_8bit_adam",
            )
    images = check_instance_images(config)
    resolved = resolve_model(config.model, config.model_options)
    if resolved.lora_path is not None:
        raise ConfigError(
            f"model {config.model!r} is a LoRA adapter; train on its base model instead",
            field="model",
        )
    storage, run_dir = run_directory(config)
    return TrainInputs(storage_path=storage, run_dir=run_dir, instance_images=images, resolved=resolved)


def check_resume(config: TrainConfig, inputs: TrainInputs) -> Path | None:
    """The checkpoint to start from (None: from scratch), per run.resume_from."""
    existing = find_checkpoints(inputs.run_dir)
    resume_from = config.run.resume_from
    if resume_from is None:
        if existing:
            step, _ = existing[-1]
            raise ConfigError(
                f"run {config.run.name!r} in {inputs.storage_path} already has checkpoints (up to "
                f"step {step}). Continue it with --set run.resume_from=latest, or start another "
                "run with --set run.name=<new name>",
                field="run.name",
            )
        return None
    if resume_from == "latest":
        latest, skipped = latest_resumable(inputs.run_dir)
        for folder, problem in skipped:
            # A newer checkpoint that cannot be resumed (a truncated copy, a crash mid-write):
            # fall back to the previous complete one, and say which one was passed over and why.
            log.warning(
                "training: warning: checkpoint %s is incomplete (%s); resuming from %s instead",
                folder, problem, latest if latest is not None else "step 0",
            )
        if latest is None:
            print(f"training: no complete checkpoint in {inputs.run_dir} yet; starting from step 0")
            return None
        checkpoint = latest
    else:
        checkpoint = Path(resume_from).expanduser().resolve()
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            raise ConfigError(
                f"run.resume_from: {checkpoint} is not a complete training checkpoint ({problem}); "
                "give a complete checkpoint-* folder of a run, or 'latest' to continue this run",
                field="run.resume_from",
            )
        if existing and checkpoint not in [p for _, p in existing]:
            raise ConfigError(
                f"run.resume_from names {checkpoint}, but run {config.run.name!r} has checkpoints of "
                "its own, which Ray Train would resume instead; give the run a new run.name",
                field="run.resume_from",
            )
    record = read_state(checkpoint) or {}
    expected = {"mode": config.train.mode, "train_text_encoder": config.train.train_text_encoder}
    if config.train.mode == "lora":
        expected["lora_rank"] = config.train.lora_rank
    for key, value in expected.items():
        if key in record and record[key] != value:
            raise ConfigError(
                f"run.resume_from: {checkpoint} was written with train.{key}={record[key]!r}, this "
                f"config has {value!r}; resume with the same setting",
                field=f"train.{key}",
            )
    if record.get("world_size") not in (None, config.scaling.num_workers):
        print(
            f"training: {checkpoint} was written by {record['world_size']} worker(s), this run has "
            f"{config.scaling.num_workers}: training continues, but the data order after the "
            "checkpoint differs from the original run's"
        )
    return checkpoint


def worker_resources(config: TrainConfig) -> dict[str, float]:
    """What one Ray Train worker asks for.

    `scaling.resources_per_worker` when set (plus 1 GPU with use_gpu). Else 1 GPU with use_gpu;
    on a one-machine Ray an equal share of its free CPUs, whole CPUs (`cpu_share`): Ray's
    own default (1 CPU per worker) would leave half of a 2-core machine idle under one worker,
    and a worker's torch threads follow its CPUs (raybooth.platform.devices.use_assigned_cpus).
    Called once on the driver with Ray up, so every worker and the placement check agree.
    """
    s = config.scaling
    if s.resources_per_worker:
        need = dict(s.resources_per_worker)
        if s.use_gpu and "GPU" not in need:
            need["GPU"] = 1.0
        return need
    if s.use_gpu:
        return {"GPU": 1.0}
    return {"CPU": float(cpu_share(s.num_workers))}


def cpu_share(num_workers: int) -> int:
    """Whole CPUs per worker on a one-machine Ray: its free CPUs, at most this machine's cores,
    split evenly, at least 1.

    On a cluster of several nodes Ray's own default (1 CPU) stays: a bigger share there could
    leave the workers unplaceable after a node is lost, when Ray Train restarts them on the
    nodes that are left (set scaling.resources_per_worker to size them on a cluster)."""
    from raybooth.platform.devices import cpu_nodes, free_cpus

    if len(cpu_nodes()) != 1:
        return 1
    return max(1, int(free_cpus() // num_workers))


def check_placement(config: TrainConfig, resources: dict[str, float] | None = None) -> None:
    """More workers than the cluster can place is an error now, not a job that waits forever.

    Counts how many workers fit on each alive node (by its total resources) and compares with
    scaling.num_workers; STRICT_SPREAD allows one worker per node.
    """
    import ray

    s = config.scaling
    need = {k: v for k, v in (resources or worker_resources(config)).items() if v > 0}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    capacity = 0
    for node in nodes:
        have = node.get("Resources", {})
        fits = min((int(have.get(k, 0.0) // v) for k, v in need.items()), default=0)
        capacity += min(fits, 1) if s.placement_strategy == "STRICT_SPREAD" else fits
    if capacity >= s.num_workers:
        return
    totals = ray.cluster_resources()
    have = ", ".join(f"{k}={totals.get(k, 0):g}" for k in need)
    raise ConfigError(
        f"scaling.num_workers={s.num_workers} workers of {need} each cannot be placed: the Ray "
        f"cluster ({len(nodes)} node(s); {have}) fits {capacity}. Lower scaling.num_workers or "
        "scaling.resources_per_worker, set scaling.use_gpu to match the cluster, or add nodes",
        field="scaling.num_workers",
    )
