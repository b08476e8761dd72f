"""What a set of class images is: the generation spec, its identity hash and per-image seeds.

A class-image set is content-addressed. Its identity is a hash of everything that changes the
pixels, so two configs that would produce the same images share one cached set, and a change to
any of those inputs gets a fresh set instead of silently mixing images:

- the model reference and the revision it resolved to (Hub commit, registry version, tiny build,
  or a fingerprint of a local directory), plus the weights variant;
- prompt, negative prompt, resolution, scheduler, steps, guidance scale and base seed;
- the batch size: batched matmuls are not batch-invariant, so the same seed gives a slightly
  different image (measured: one pixel value off by one) alone than in a batch of five. Images are
  therefore always generated in fixed, index-aligned blocks of `batch_size`, and image i is
  byte-identical however often it is regenerated;
- device kind and precision (GPU fp16 and CPU fp32 differ by far more than one bit);
- on the CPU, torch's thread count (`priors.cpus_per_actor`, rounded down): a matmul split over
  more threads sums in another order (measured: 9 of 16 tiny-model images differ between one and
  two threads). Every actor of a CPU set uses exactly that many threads.

Not part of the identity: how many images are asked for (a bigger request adds images to the same
set), how many actors make them, where they are stored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raybooth.platform.config import ModelOptions, TrainConfig
from raybooth.platform.errors import ConfigError, ModelError
from raybooth.platform.mlflow.refs import MODELS_PREFIX
from raybooth.platform.models import ResolvedModel, resolve_model
from raybooth.platform.generation import GenerationParams
from raybooth.platform.schedulers import check_scheduler

# Bump when the way images are made changes (seeding, block layout, encoding): a new identity.
SPEC_FORMAT = 1
IDENTITY_CHARS = 16
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class PriorSpec:
    """Everything an actor needs to make image i of a set, and nothing that does not change it."""

    model_ref: str  # what actors resolve: pinned to the driver's resolved revision
    model_kind: str
    model_revision: str | None
    variant: str | None
    prompt: str
    negative_prompt: str
    resolution: int
    scheduler: str
    steps: int
    guidance_scale: float
    seed: int
    batch_size: int
    device: str  # "cpu" | "cuda"
    dtype: str  # "fp32" | "fp16"
    cpu_threads: int | None  # torch intra-op threads on the CPU; None on a GPU

    def identity_inputs(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, **asdict(self)}

    @property
    def identity(self) -> str:
        canonical = json.dumps(self.identity_inputs(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:IDENTITY_CHARS]

    def params(self) -> GenerationParams:
        return GenerationParams(
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            height=self.resolution,
            width=self.resolution,
        )

    def block_of(self, index: int) -> int:
        return index // self.batch_size

    def block_indices(self, block: int) -> list[int]:
        """All indices of an aligned block: generated together even when only some are needed."""
        start = block * self.batch_size
        return list(range(start, start + self.batch_size))


def seed_for(base_seed: int, index: int) -> int:
    """The seed of image `index`: a hash, so neighbouring sets (seed 0 and seed 1) share no images."""
    digest = hashlib.sha256(f"raybooth-prior:{base_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def local_fingerprint(path: Path) -> str:
    """A revision for a local diffusers directory: its config files' contents and the names and
    sizes of its weight files (hashing gigabytes of weights on every run would be too slow)."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if file.suffix in {".json", ".txt"}:
            h.update(f"{rel}\0".encode() + file.read_bytes() + b"\0")
        else:
            h.update(f"{rel}\0{file.stat().st_size}\0".encode())
    return "local-" + h.hexdigest()[:16]


def _pinned_ref(resolved: ResolvedModel) -> str:
    """The reference actors load, pinned so they all get what the driver resolved."""
    if resolved.kind == "local":
        return str(resolved.path)
    if resolved.kind == "mlflow" and resolved.revision and "@" in resolved.ref:
        # An alias can move while the job runs; the version it pointed at cannot.
        name = resolved.ref.removeprefix(MODELS_PREFIX).split("@", 1)[0]
        return f"{MODELS_PREFIX}{name}/{resolved.revision}"
    return resolved.ref


def actor_model_options(config: TrainConfig, spec: PriorSpec) -> ModelOptions:
    """The driver's model options with the Hub revision pinned to the resolved commit."""
    options = config.model_options.model_copy()
    if spec.model_kind == "hub" and spec.model_revision:
        options.revision = spec.model_revision
    return options


def resolution_of(config: TrainConfig) -> int:
    resolution = config.priors.resolution or config.train.resolution
    if resolution < 8 or resolution % 8:
        raise ConfigError(
            f"priors.resolution must be a positive multiple of 8 (got {resolution})",
            field="priors.resolution",
        )
    return resolution


def resolve_inputs(config: TrainConfig) -> ResolvedModel:
    """Check the inputs and resolve the model on the driver — before Ray, any actor or any GPU."""
    if not config.subject.class_prompt.strip():
        raise ConfigError(
            "subject.class_prompt is empty: prior preservation needs a prompt for the subject's "
            "class, e.g. 'a photo of a dog' (or set priors.enabled: false)",
            field="subject.class_prompt",
        )
    check_scheduler(config.priors.scheduler, field="priors.scheduler")
    resolution_of(config)
    try:
        return resolve_model(config.model, config.model_options)
    except ModelError as exc:
        raise ModelError(
            f"priors: the base model cannot be resolved, so no class images can be made: {exc.message}",
            field=exc.field or "model",
        ) from None


def build_spec(config: TrainConfig, resolved: ResolvedModel, *, use_gpu: bool) -> PriorSpec:
    if resolved.kind == "local":
        revision = local_fingerprint(resolved.path)
    else:
        # Hub commit, tiny build, or registry version (which also pins a registered LoRA adapter).
        revision = resolved.revision
    spec = PriorSpec(
        model_ref=_pinned_ref(resolved),
        model_kind=resolved.kind,
        model_revision=revision,
        variant=resolved.variant,
        prompt=config.subject.class_prompt.strip(),
        negative_prompt=config.priors.negative_prompt.strip(),
        resolution=resolution_of(config),
        scheduler=config.priors.scheduler,
        steps=config.priors.steps,
        guidance_scale=float(config.priors.guidance_scale),
        seed=config.priors.seed,
        batch_size=config.priors.batch_size,
        device="cuda" if use_gpu else "cpu",
        dtype="fp16" if use_gpu else "fp32",
        cpu_threads=None if use_gpu else max(1, int(config.priors.cpus_per_actor)),
    )
    spec.params().check()
    return spec
