"""Class images for DreamBooth's prior-preservation loss, made by a pool of Ray actors.

    from raybooth.jobs.priors.job import ensure_class_images
    class_set = ensure_class_images(config)   # fills <priors.class_data_dir>/<identity>/

The set is content-addressed (see raybooth.jobs.priors.spec): image i is made from a seed derived from
(priors.seed, i), so it is the same whoever makes it and whenever. A rerun verifies what is
there against the manifest's checksums and generates only what is missing or corrupt; asking for
more images adds only the new indices. Actors return PNG bytes and the driver writes them, so the
set can live anywhere the training job can read (see priors_store).

`raybooth priors --config FILE [--set k=v ...]` runs it from the command line; `raybooth train`
runs it before training when `priors.enabled` is true.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from raybooth.jobs.priors.spec import (
    PriorSpec,
    actor_model_options,
    build_spec,
    resolve_inputs,
    seed_for,
)
from raybooth.jobs.priors.store import (
    MANIFEST,
    Manifest,
    SetStore,
    image_name,
    load_manifest,
    open_store,
    set_lock,
    sha256,
    verify,
)
from raybooth.platform.config import TrainConfig, add_config_arguments

log = logging.getLogger("raybooth.priors")


@dataclass
class ClassImageSet:
    """A filled class-image set.

    For a set on this machine's filesystem (a path or `file://`), `directory` and `images` are
    local paths. For a remote store (`s3://…`) they only name the objects (`Path(uri)`, not
    readable as files); read those through `uri` and `image_uris` (e.g. with pyarrow.fs).
    """

    directory: Path
    identity: str
    images: list[Path]  # sorted by index, exactly priors.num_class_images
    generated: int  # made in this call
    manifest: dict[str, Any]
    uri: str = ""
    image_uris: list[str] = field(default_factory=list)
    reused: int = 0  # verified by checksum and kept
    corrupt: int = 0  # failed their checksum and were made again
    num_actors: int = 0  # started in this call (0: nothing to make)
    actor_replacements: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.generated and self.seconds else 0.0


@dataclass
class BatchWritten:
    """Passed to `on_batch_written` after each block is on disk (progress hooks, fault tests)."""

    indices: list[int]  # written just now
    done: int  # verified or written so far, of `total`
    total: int
    pool: Any  # the PriorPool: its `busy_actors()` are the ones holding work


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS (a cluster, a RayJob) is honoured by ray.init(); otherwise a local instance.
        ray.init()


def _visible_gpus() -> float:
    """GPUs the actors could use. Without Ray running yet, a local instance would see exactly
    the GPUs torch sees here, so a rerun with nothing to make never has to start Ray."""
    import ray

    if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
        _ensure_ray()
    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    import torch

    return float(torch.cuda.device_count())


@dataclass
class _State:
    spec: PriorSpec
    store: SetStore
    manifest: Manifest
    good: list[int]
    missing: list[int]
    corrupt: list[int]

    @property
    def todo(self) -> list[int]:
        return sorted(self.missing + self.corrupt)


def _inspect(spec: PriorSpec, store: SetStore, count: int) -> _State:
    manifest, dropped = load_manifest(store, spec.identity, spec.identity_inputs())
    if dropped:
        log.warning("%s/%s ignored (%s): every image will be verified anew", store.location, MANIFEST, dropped)
    good, missing, corrupt = verify(store, manifest, range(count))
    if corrupt:
        log.warning(
            "%d class image(s) in %s failed their checksum (truncated or changed): making them again: %s",
            len(corrupt), store.location, corrupt[:10],
        )
    return _State(spec, store, manifest, good, missing, corrupt)


def ensure_class_images(
    config: TrainConfig,
    *,
    progress: bool = True,
    on_batch_written: Callable[[BatchWritten], None] | None = None,
) -> ClassImageSet:
    """Fill `<priors.class_data_dir>/<identity>/` up to `priors.num_class_images` images.

    Reuses every image whose checksum matches; generates the rest with a pool of Ray actors
    (starting a local Ray when none is running). Raises a UserError before Ray or any actor starts
    when the class prompt is empty or the model reference cannot be resolved.
    """
    t0 = time.perf_counter()
    priors = config.priors
    resolved = resolve_inputs(config)
    gpus = _visible_gpus()
    while True:
        spec = build_spec(config, resolved, use_gpu=gpus > 0 and priors.gpus_per_actor > 0)
        store = open_store(priors.class_data_dir, spec.identity)
        with set_lock(store):
            # Under the lock: a process that held it before us may have filled the set already.
            state = _inspect(spec, store, priors.num_class_images)
            pool = None
            if state.todo:
                _ensure_ray()
                cluster_gpus = _visible_gpus()
                if (cluster_gpus > 0) != (gpus > 0):
                    # The cluster has other devices than this machine: another device, another set.
                    gpus = cluster_gpus
                    continue
                pool = _generate(config, state, state.todo, gpus, progress, on_batch_written)
            elif store.read(MANIFEST) is None:
                state.manifest.save(store)
        break

    wanted = range(priors.num_class_images)
    local = store.local_path()
    directory = local if local is not None else Path(store.location)
    return ClassImageSet(
        directory=directory,
        identity=state.spec.identity,
        images=[(local / image_name(i)) if local is not None else Path(store.uri(image_name(i))) for i in wanted],
        generated=len(state.todo),
        manifest=state.manifest.to_json(),
        uri=store.uri(),
        image_uris=[store.uri(image_name(i)) for i in wanted],
        reused=len(state.good),
        corrupt=len(state.corrupt),
        num_actors=pool.plan.num_actors if pool else 0,
        actor_replacements=pool.replacements if pool else 0,
        seconds=time.perf_counter() - t0,
    )


def _generate(
    config: TrainConfig,
    state: _State,
    todo: list[int],
    gpus: float,
    progress: bool,
    on_batch_written: Callable[[BatchWritten], None] | None,
):
    from tqdm.auto import tqdm

    from raybooth.jobs.priors.actor import plan_actors
    from raybooth.jobs.priors.pool import PriorPool
    from raybooth.platform.devices import free_cpus

    priors = config.priors
    spec, store, manifest = state.spec, state.store, state.manifest
    work: dict[int, list[int]] = {}
    for index in todo:
        work.setdefault(spec.block_of(index), []).append(index)
    plan = plan_actors(
        priors.num_actors,
        blocks=len(work),
        cpus_per_actor=priors.cpus_per_actor,
        gpus_per_actor=priors.gpus_per_actor,
        total_gpus=gpus,
        available_cpus=free_cpus(),
    )
    total = priors.num_class_images
    log.info(
        "class images %s: %d to make (%d reused), %s", store.location, len(todo), len(state.good), plan.describe()
    )
    remaining = set(todo)
    bar = tqdm(total=total, initial=len(state.good), unit="img", desc="class images", disable=not progress)
    started = time.perf_counter()
    pool = PriorPool(spec, actor_model_options(config, spec), plan)
    try:

        def on_result(results: list[tuple[int, bytes]]) -> None:
            written = []
            for index, png in results:
                if index not in remaining:
                    continue  # already written (a late result from a replaced actor): never twice
                name = image_name(index)
                store.write(name, png)
                manifest.images[index] = {
                    "file": name,
                    "sha256": sha256(png),
                    "seed": seed_for(spec.seed, index),
                    "bytes": len(png),
                }
                remaining.discard(index)
                written.append(index)
            # The manifest follows the images: it only ever vouches for files already in place.
            manifest.save(store)
            bar.update(len(written))
            made = len(todo) - len(remaining)
            bar.set_postfix_str(f"{made / max(time.perf_counter() - started, 1e-9):.2f} images/s made")
            if on_batch_written is not None:
                on_batch_written(BatchWritten(written, total - len(remaining), total, pool))

        pool.run(work, on_result)
    finally:
        pool.shutdown()
        bar.close()
    if remaining:  # pool.run returns only when every block came back; this guards the invariant
        raise RuntimeError(f"class images {sorted(remaining)} were not generated")
    return pool


# ---------------------------------------------------------------------------------------------
# `raybooth priors`


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "priors",
        help="generate (or reuse) the class images for DreamBooth's prior preservation",
        description="Fill <priors.class_data_dir>/<identity>/ with priors.num_class_images images "
        "of subject.class_prompt, using a pool of Ray actors; reuses every image already there.",
    )
    add_config_arguments(p, "a training config (configs/train/*.yaml)", "priors.num_class_images=200")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_priors)


def cmd_priors(args: argparse.Namespace) -> int:
    from raybooth.platform.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, args.overrides)
    if not config.priors.enabled:
        print("note: priors.enabled is false, so `raybooth train` will not use these images")
    result = ensure_class_images(config, progress=not args.no_progress)
    rate = f", {result.images_per_second:.2f} images/s" if result.generated else ""
    print(
        f"class images: {result.uri}\n"
        f"  identity {result.identity}: {len(result.images)} images — {result.generated} generated "
        f"({result.corrupt} were corrupt), {result.reused} reused; {result.num_actors} actor(s)"
        f"{rate}, {result.seconds:.1f} s"
    )
    return 0
