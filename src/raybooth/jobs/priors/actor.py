"""The class-image actor (one loaded pipeline, many batches) and how many of them to start."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from raybooth.jobs.priors.spec import PriorSpec, seed_for
from raybooth.platform.config import ModelOptions
from raybooth.platform.errors import ModelError, UserError
from raybooth.platform.images import png_bytes
from raybooth.platform.quiet import quiet_libraries


class ClassImageActor:
    """Loads the base pipeline once, then turns index blocks into PNG bytes.

    Used as a Ray actor (`ray.remote(ClassImageActor)`); plain Python otherwise, so the benchmark
    and the plain loop run exactly the same code.
    """

    def __init__(self, spec: PriorSpec, options: ModelOptions):
        import torch

        from raybooth.platform.pipelines import DiffusionRunner

        # The driver shows the one progress bar that matters; load bars from every actor would
        # interleave with it.
        quiet_libraries()
        if spec.cpu_threads:
            # Exactly the threads the set's identity says (they change the low bits of the
            # pixels), which are also the CPUs this actor reserved.
            torch.set_num_threads(spec.cpu_threads)
        self.spec = spec
        self.error: UserError | None = None
        try:
            self.runner = DiffusionRunner(spec.model_ref, options=options, device=spec.device, dtype=spec.dtype)
        except UserError as exc:
            # Kept and raised from each call rather than from __init__: Ray reports a failed
            # constructor only as text, while a call's exception reaches the driver as itself.
            self.error = exc
            return
        got = self.runner.resolved.revision
        if spec.model_kind in {"hub", "tiny"} and got != spec.model_revision:
            # Another revision would give other pixels under the same identity.
            self.error = ModelError(
                f"model {spec.model_ref!r} resolved to revision {got!r} on this node but to "
                f"{spec.model_revision!r} on the driver",
                field="model",
            )
        self.params = spec.params()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def ready(self) -> dict[str, Any]:
        self._check()
        return {"pid": os.getpid(), **self.runner.describe(), "load_s": self.runner.load_s}

    def generate(self, block: int, keep: list[int]) -> list[tuple[int, bytes]]:
        """Generate the whole aligned block (so every image is made in the same batch layout
        every time) and return the PNG bytes of the indices in `keep`."""
        self._check()
        indices = self.spec.block_indices(block)
        seeds = [seed_for(self.spec.seed, i) for i in indices]
        prompts = [self.spec.prompt] * len(indices)
        negatives = [self.spec.negative_prompt] * len(indices) if self.spec.negative_prompt else None
        images = self.runner.text_to_image(prompts, seeds, self.params, negatives)
        wanted = set(keep)
        return [(i, png_bytes(img)) for i, img in zip(indices, images) if i in wanted]


@dataclass(frozen=True)
class ActorPlan:
    num_actors: int
    num_cpus: float
    num_gpus: float
    use_gpu: bool

    def describe(self) -> str:
        per = f"{self.num_gpus:g} GPU" if self.use_gpu else f"{self.num_cpus:g} CPU"
        return f"{self.num_actors} actor(s), {per} each"


def cluster_gpus(resources: dict[str, float]) -> float:
    return float(resources.get("GPU", 0.0))


def plan_actors(
    num_actors: int | str,
    *,
    blocks: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    total_gpus: float,
    available_cpus: float,
) -> ActorPlan:
    """How many actors, with what resources.

    `auto`: one per GPU when the cluster has GPUs (`gpus_per_actor` < 1 packs several small models
    onto one GPU), else as many as the free CPUs hold at `cpus_per_actor` each. Never more actors
    than blocks of work: an actor costs a model load.
    """
    use_gpu = total_gpus > 0 and gpus_per_actor > 0
    if num_actors == "auto":
        if use_gpu:
            n = math.floor(total_gpus / gpus_per_actor + 1e-9)
        else:
            n = math.floor(available_cpus / cpus_per_actor + 1e-9)
    else:
        n = int(num_actors)
    n = max(1, min(n, blocks))
    return ActorPlan(num_actors=n, num_cpus=cpus_per_actor, num_gpus=gpus_per_actor if use_gpu else 0.0, use_gpu=use_gpu)
