"""The model deployments: `TextToImage` and `Inpainting`, one loaded pipeline per replica.

- Requests are batched with `@serve.batch`, sized in images (`batch_size_fn`), and a batch is run
  as one pipeline call per group of compatible requests (raybooth.serve_apps.batching).
- LoRA subjects (DreamBooth adapters) are loaded onto the replica's one base pipeline with
  `@serve.multiplexed`: a replica keeps up to `max_loaded_subjects` of them, evicting the least
  recently used, and Serve routes a subject's requests to replicas that have it loaded. Serve
  splits batches by multiplexed model id, so a batch never mixes subjects.
- `max_batch_size` and `batch_wait_timeout_s` come from `user_config`: `serve deploy` with new
  values reconfigures running replicas without restarting them.
- A denoise never runs on the event loop (a worker thread does it), and a lock keeps one
  pipeline call at a time per replica: the pipeline is not thread-safe, and the event loop stays
  free to accept the next batch meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field
from ray import serve

from raybooth.platform.config import Section, validate_config
from raybooth.platform.devices import use_assigned_cpus
from raybooth.platform.errors import ConfigError, UserError
from raybooth.platform.generation import GENERATION_DEFAULTS
from raybooth.platform.images import png_bytes
from raybooth.platform.lora import WEIGHTS_NAME
from raybooth.platform.mlflow.refs import MODELS_PREFIX
from raybooth.platform.pipelines import DiffusionRunner
from raybooth.serve_apps.batching import (
    ImageJob,
    JobResult,
    group_jobs,
    images_in,
    merge_results,
    run_group,
)
from raybooth.serve_apps.settings import INPAINTING, TEXT_TO_IMAGE, ModelSpec

logger = logging.getLogger("ray.serve")

DEFAULT_USER_CONFIG = {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}


class BatchConfig(Section):
    """`user_config` of a model deployment (changes apply to running replicas)."""

    max_batch_size: int = Field(default=8, ge=1, le=256, description="images per batch")
    batch_wait_timeout_s: float = Field(default=0.05, ge=0, le=60)


def adapter_name(subject: str) -> str:
    # peft adapter names become module attribute names: keep to identifier characters.
    return "subject_" + re.sub(r"[^A-Za-z0-9_]", "_", subject)


class LoadedSubject:
    """A LoRA subject on this replica's pipeline; what `@serve.multiplexed` caches.

    The multiplexer calls `__del__` (in a worker thread) when it evicts the subject; Python may
    call it again at garbage collection, so unloading is idempotent.
    """

    def __init__(self, server: "ImageModel", subject: str, adapter: str, path: Path):
        self.server = server
        self.subject = subject
        self.adapter = adapter
        self.path = path
        self._released = False

    def __del__(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            if self.server._lock_owner == threading.get_ident():
                # Garbage collection inside a pipeline call on this very thread: unloading now
                # would deadlock (or pull the adapter from under the call). Do it afterwards.
                threading.Thread(target=self.server._release, args=(self,), daemon=True).start()
            else:
                self.server._release(self)
        except Exception:  # never raise from __del__ (interpreter shutdown, a dead runner)
            pass


class ImageModel:
    """Shared implementation of the two model deployments."""

    TASK = TEXT_TO_IMAGE

    def __init__(self, spec: dict[str, Any], deployment: str):
        self.spec: ModelSpec = validate_config(dict(spec), ModelSpec, f"{deployment} model")
        self.deployment = deployment
        self.name = self.spec.name or self.spec.model
        # On a CPU the replica computes with the cores it reserved (ray_actor_options.num_cpus).
        self.torch_threads = use_assigned_cpus(self.spec.torch_threads)
        for subject, ref in self.spec.subjects.items():
            _check_subject_ref(subject, ref)
        self.runner = DiffusionRunner(
            self.spec.model,
            options=self.spec.model_options,
            device=self.spec.device,
            dtype=self.spec.dtype,
            channels_last=self.spec.channels_last,
            compile_unet=self.spec.compile_unet,
        )
        if self.TASK == TEXT_TO_IMAGE and self.runner.is_inpainting_model:
            raise ConfigError(
                f"{deployment}: model {self.spec.model!r} is an inpainting model (9-channel UNet); "
                "list it under `inpainting:`, not `text_to_image:`",
                field="text_to_image",
            )
        # A registered LoRA model as the base: its adapter is part of the model itself.
        self.base_lora = "default" if self.runner.resolved.lora_path is not None else None
        self._lock = threading.Lock()
        self._lock_owner: int | None = None  # thread id holding _lock (see LoadedSubject.__del__)
        self._live: dict[str, LoadedSubject] = {}  # adapter -> what the multiplexer holds
        self.max_batch_size = DEFAULT_USER_CONFIG["max_batch_size"]
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id if context else "local"

        async def raybooth_load_subject(subject: str) -> LoadedSubject:
            return await self._open_subject(subject)

        # Wired per instance so `max_loaded_subjects` comes from the config, not the code.
        self._subjects = serve.multiplexed(max_num_models_per_replica=self.spec.max_loaded_subjects)(
            raybooth_load_subject
        )
        from raybooth.serve_apps.metrics import ModelMetrics

        self.metrics = ModelMetrics(self.TASK)
        self._warm_up()
        logger.info(
            "%s ready: model %s (%s) on %s %s, %d subjects configured, load %.1fs",
            deployment, self.name, self.spec.model, self.runner.device, self.runner.dtype,
            len(self.spec.subjects), self.runner.load_s,
        )

    # ------------------------------------------------------------------ Serve hooks

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = validate_config(dict(user_config or {}), BatchConfig, f"{self.deployment} user_config")
        self._run_batch.set_max_batch_size(cfg.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.max_batch_size = cfg.max_batch_size
        logger.info("%s batching: max_batch_size=%d images, batch_wait_timeout_s=%.3f",
                    self.deployment, cfg.max_batch_size, cfg.batch_wait_timeout_s)

    def check_health(self) -> None:
        if getattr(self, "runner", None) is None:
            raise RuntimeError("the pipeline is not loaded")

    # ------------------------------------------------------------------ requests

    async def generate(self, job: ImageJob) -> JobResult:
        job.arrived = time.perf_counter()
        limit = self.max_batch_size
        if job.n <= limit:
            return await self._run_batch(job)
        # More images than one batch may hold: run them as several batch entries.
        parts = await asyncio.gather(*(self._run_batch(part) for part in job.split(limit)))
        return merge_results(list(parts))

    async def info(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "deployment": self.deployment,
            "max_batch_size": self.max_batch_size,
            "loaded_subjects": sorted(h.subject for h in self._live.values()),
            **self.runner.describe(),
        }

    @serve.batch(max_batch_size=DEFAULT_USER_CONFIG["max_batch_size"],
                 batch_wait_timeout_s=DEFAULT_USER_CONFIG["batch_wait_timeout_s"],
                 max_concurrent_batches=1, batch_size_fn=images_in)
    async def _run_batch(self, jobs: list[ImageJob]) -> list[JobResult]:
        batch_images = images_in(jobs)
        self.metrics.batch(batch_images)
        results: list[JobResult | None] = [None] * len(jobs)
        handles: dict[str, LoadedSubject | JobResult] = {}
        for subject in {job.subject for job in jobs if job.subject}:
            handles[subject] = await self._subject_or_error(subject)
        for idxs in group_jobs(jobs):
            group = [jobs[i] for i in idxs]
            subject = group[0].subject
            handle = handles.get(subject) if subject else None
            if isinstance(handle, JobResult):
                for i in idxs:
                    results[i] = handle
                continue
            for i, result in zip(idxs, await self._run_one_group(group, handle, batch_images)):
                results[i] = result
        return results  # type: ignore[return-value]

    async def _run_one_group(self, group: list[ImageJob], handle: LoadedSubject | None,
                             batch_images: int) -> list[JobResult]:
        try:
            images, started, seconds = await asyncio.to_thread(self._generate_group, group, handle)
        except UserError as exc:
            return [JobResult.failed(400, "invalid_request", exc.message, exc.field)] * len(group)
        except Exception as exc:  # a broken model is not the client's fault: 500, logged
            logger.exception("%s: pipeline call failed", self.deployment)
            return [JobResult.failed(500, "generation_failed", f"generation failed: {type(exc).__name__}")] * len(group)
        group_images = sum(job.n for job in group)
        queue = [max(0.0, started - job.arrived) for job in group]
        self.metrics.group(group[0].subject or self.name, group_images, queue, seconds)
        model = {"model": group[0].subject or self.name, "base_model": self.name,
                 **{k: v for k, v in self.runner.describe().items() if k in ("model_revision", "device", "dtype")}}
        out = []
        for job, job_images, q in zip(group, images, queue):
            w, h = job_images[0].size
            out.append(JobResult(
                images=[png_bytes(img, fast=True) for img in job_images], seeds=list(job.seeds), width=w, height=h,
                batch_size=batch_images, group_size=group_images, queue_s=q, inference_s=seconds,
                replica=self.replica, model=model,
            ))
        return out

    @contextlib.contextmanager
    def _pipeline(self):
        """The replica's one-call-at-a-time lock, remembering which thread holds it."""
        with self._lock:
            self._lock_owner = threading.get_ident()
            try:
                yield
            finally:
                self._lock_owner = None

    def _generate_group(self, group: list[ImageJob], handle: LoadedSubject | None):
        """In a worker thread: one pipeline call under the replica's lock."""
        with self._pipeline():
            started = time.perf_counter()
            lora = self.base_lora
            if handle is not None:
                if handle.adapter not in self.runner.adapters:
                    # Evicted between routing and now (another subject's load): load it for this
                    # call only, and drop it again below unless the multiplexer holds it.
                    self.runner.load_lora(handle.path, name=handle.adapter)
                lora = handle.adapter
            try:
                images = run_group(self.runner, group, lora)
            finally:
                if handle is not None and handle.adapter not in self._live:
                    self.runner.unload_lora(handle.adapter)
            return images, started, time.perf_counter() - started

    # ------------------------------------------------------------------ subjects

    async def _subject_or_error(self, subject: str) -> LoadedSubject | JobResult:
        try:
            return await self._subjects(subject)
        except UserError as exc:
            return JobResult.failed(404 if exc.field == "model" else 500, "subject_unavailable", exc.message, "model")
        except Exception as exc:
            logger.exception("%s: loading subject %r failed", self.deployment, subject)
            return JobResult.failed(500, "subject_unavailable",
                                    f"subject {subject!r} could not be loaded: {type(exc).__name__}: {exc}", "model")

    async def _open_subject(self, subject: str) -> LoadedSubject:
        # The multiplexer's loader: names were checked at the ingress; check again here, since
        # anything that can reach this replica could send a model id.
        if subject not in self.spec.subjects:
            raise UserError(f"subject {subject!r} is not configured on {self.deployment}", field="model")
        path = await asyncio.to_thread(_subject_path, subject, self.spec.subjects[subject], self.spec)
        handle = LoadedSubject(self, subject, adapter_name(subject), path)
        await asyncio.to_thread(self._attach, handle)
        self.metrics.subject_loads.inc(tags={"task": self.TASK})
        logger.info("%s: subject %r loaded from %s", self.deployment, subject, path)
        return handle

    def _attach(self, handle: LoadedSubject) -> None:
        with self._pipeline():
            try:
                self.runner.load_lora(handle.path, name=handle.adapter)
            except UserError:
                handle._released = True  # nothing to release
                raise
            self._live[handle.adapter] = handle

    def _release(self, handle: LoadedSubject) -> None:
        with self._pipeline():
            if self._live.get(handle.adapter) is handle:
                del self._live[handle.adapter]
                self.runner.unload_lora(handle.adapter)
        logger.info("%s: subject %r unloaded", self.deployment, handle.subject)

    # ------------------------------------------------------------------ start-up

    def _warm_up(self) -> None:
        """One small generation before the replica reports healthy: first-call costs (kernel
        selection, allocator growth, lazy imports) are paid here, not by the first client."""
        steps = self.spec.warmup_steps
        if steps <= 0:
            return
        from PIL import Image, ImageDraw

        size = self.runner.default_size
        shared = dict(guidance_scale=GENERATION_DEFAULTS.guidance_scale, scheduler=GENERATION_DEFAULTS.scheduler)
        if self.TASK == TEXT_TO_IMAGE:
            job = ImageJob(task=self.TASK, prompt="warm-up", seeds=[0], steps=steps, **shared)
        else:
            image = Image.new("RGB", (size, size), (128, 128, 128))
            mask = Image.new("L", (size, size), 0)
            ImageDraw.Draw(mask).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=255)
            job = ImageJob(task=self.TASK, prompt="warm-up", seeds=[0], steps=steps, **shared,
                           image=image, mask=mask)
        t0 = time.perf_counter()
        with self._pipeline():
            run_group(self.runner, [job], self.base_lora)
        logger.info("%s warm-up: %d steps in %.2fs", self.deployment, steps, time.perf_counter() - t0)


def _check_subject_ref(subject: str, ref: str) -> None:
    """At start-up, without I/O beyond the local disk: fail the deployment on a subject that can
    never load, rather than the first request for it."""
    if ref.startswith(MODELS_PREFIX):
        return
    path = Path(ref).expanduser()
    if not (path / WEIGHTS_NAME).is_file() and not (path.is_file() and path.suffix == ".safetensors"):
        raise ConfigError(
            f"subject {subject!r}: {ref} is not a LoRA adapter (no {WEIGHTS_NAME} there); give the "
            "`lora` folder of a `raybooth train` run with train.mode=lora, or models:/NAME@ALIAS",
            field=f"subjects.{subject}",
        )


def _subject_path(subject: str, ref: str, spec: ModelSpec) -> Path:
    if not ref.startswith(MODELS_PREFIX):
        return Path(ref).expanduser()
    from raybooth.platform.models import resolve_model

    resolved = resolve_model(ref, spec.model_options)  # MLflow: downloads the version's files
    if resolved.lora_path is None:
        raise UserError(
            f"subject {subject!r}: {ref} is a full model, not a LoRA adapter; serve it as its own "
            f"model (a `text_to_image:` entry with model: {ref})",
            field="subjects",
        )
    return Path(resolved.lora_path)


# Defaults of both model deployments; a Serve config's `deployments:` overrides any of them.
DEPLOYMENT_DEFAULTS: dict[str, Any] = dict(
    max_ongoing_requests=16,
    max_queued_requests=64,
    user_config=DEFAULT_USER_CONFIG,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=60,
)


@serve.deployment(name="TextToImage", **DEPLOYMENT_DEFAULTS)
class TextToImage(ImageModel):
    TASK = TEXT_TO_IMAGE


@serve.deployment(name="Inpainting", **DEPLOYMENT_DEFAULTS)
class Inpainting(ImageModel):
    TASK = INPAINTING
