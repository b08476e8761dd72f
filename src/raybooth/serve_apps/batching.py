"""Work items between the ingress and the model replicas, and how a batch of them becomes
pipeline calls.

A batch (what `@serve.batch` hands a replica) holds requests that may differ in size, steps,
scheduler, guidance, strength... Only requests that agree on all of those can share one
diffusers call, so a batch is split into groups by `group_key`, and each group runs as one
`DiffusionRunner` call with one prompt and one seed (one generator) per image. An image therefore
depends on its own prompt and seed and the group's shared parameters, never on its neighbours:
the same request gives the same image alone or batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from raybooth.platform.generation import GenerationParams, InpaintParams, group_indices
from raybooth.platform.pipelines import DiffusionRunner
from raybooth.serve_apps.settings import INPAINTING, TEXT_TO_IMAGE


@dataclass
class ImageJob:
    """One HTTP request's work: n images (one seed each) with shared parameters."""

    task: str
    prompt: str
    seeds: list[int]
    steps: int
    guidance_scale: float
    scheduler: str
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    subject: str | None = None  # LoRA subject on the replica's base model (multiplexed id)
    # inpainting
    image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float = 1.0
    mask_blur: float = 0.0
    crop_margin: int | None = None
    request_id: str = ""
    arrived: float = 0.0  # perf_counter() when the replica received it

    @property
    def n(self) -> int:
        return len(self.seeds)

    def params(self, lora: str | None) -> GenerationParams:
        shared = dict(steps=self.steps, guidance_scale=self.guidance_scale, scheduler=self.scheduler,
                      height=self.height, width=self.width, lora=lora)
        if self.task == INPAINTING:
            return InpaintParams(**shared, strength=self.strength, mask_blur=self.mask_blur,
                                 crop_margin=self.crop_margin)
        return GenerationParams(**shared)

    def group_key(self) -> tuple:
        """Everything that must be equal for two jobs to share one pipeline call."""
        params = self.params(lora=None)
        key: tuple = (self.subject, *params.key())
        if isinstance(params, InpaintParams) and self.image is not None:
            # Whole-image inpainting generates at the image's own (rounded) size.
            key += (params.generation_size(self.image.size),)
        return key

    def split(self, size: int) -> list["ImageJob"]:
        """Chunks of at most `size` images (a request bigger than the batch limit)."""
        from dataclasses import replace

        return [replace(self, seeds=self.seeds[i : i + size]) for i in range(0, self.n, size)]


@dataclass
class JobResult:
    """What a replica answers for one job (a plain object: it crosses processes)."""

    images: list[bytes] = field(default_factory=list)  # PNG
    seeds: list[int] = field(default_factory=list)
    width: int = 0
    height: int = 0
    batch_size: int = 0  # images in the Serve batch this job ran in
    group_size: int = 0  # images in its pipeline call
    queue_s: float = 0.0  # from arrival at the replica to the start of its pipeline call
    inference_s: float = 0.0
    replica: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # {"status", "code", "message", "field"}

    @classmethod
    def failed(cls, status: int, code: str, message: str, field_name: str | None = None) -> "JobResult":
        return cls(error={"status": status, "code": code, "message": message, "field": field_name})


def images_in(jobs: list[ImageJob]) -> int:
    """`batch_size_fn` for `@serve.batch`: a batch is sized in images, not requests."""
    return sum(job.n for job in jobs)


def group_jobs(jobs: list[ImageJob]) -> list[list[int]]:
    """Indices of `jobs` per group, groups in order of their first job (first come, first run)."""
    return group_indices(job.group_key() for job in jobs)


def run_group(runner: DiffusionRunner, jobs: list[ImageJob], lora: str | None) -> list[list[Image.Image]]:
    """One pipeline call for jobs that share a group key; the images of each job, in order."""
    first = jobs[0]
    params = first.params(lora)
    prompts = [job.prompt for job in jobs for _ in job.seeds]
    seeds = [seed for job in jobs for seed in job.seeds]
    negatives = None
    if any(job.negative_prompt for job in jobs):
        # "" is what the pipeline uses for "no negative prompt" too: mixing is exact.
        negatives = [job.negative_prompt or "" for job in jobs for _ in job.seeds]
    if first.task == TEXT_TO_IMAGE:
        images = runner.text_to_image(prompts, seeds, params, negatives)
    else:
        sources = [job.image for job in jobs for _ in job.seeds]
        masks = [job.mask for job in jobs for _ in job.seeds]
        images = runner.inpaint(sources, masks, prompts, seeds, params, negatives)  # type: ignore[arg-type]
    out, k = [], 0
    for job in jobs:
        out.append(images[k : k + job.n])
        k += job.n
    return out


def merge_results(parts: list[JobResult]) -> JobResult:
    """One result for a job that was split into chunks (more images than a batch holds)."""
    for part in parts:
        if part.error:
            return part
    first = parts[0]
    return JobResult(
        images=[img for p in parts for img in p.images],
        seeds=[s for p in parts for s in p.seeds],
        width=first.width,
        height=first.height,
        batch_size=max(p.batch_size for p in parts),
        group_size=max(p.group_size for p in parts),
        queue_s=first.queue_s,
        inference_s=sum(p.inference_s for p in parts),
        replica=first.replica,
        model=first.model,
    )
