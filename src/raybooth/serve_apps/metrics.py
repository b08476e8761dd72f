"""Application metrics, exported through Ray's Prometheus endpoint beside Serve's own.

Ray prefixes every name with `ray_` (and counters end in `_total`) and adds the tags
`deployment`, `replica` and `application` itself (so they are not tag keys here). Created inside a replica, never at import time: a metric
object needs a running Ray worker.

| metric (as Prometheus shows it)                | kind      | tags        |
| ---------------------------------------------- | --------- | ----------- |
| ray_raybooth_images_generated_total            | counter   | task, model |
| ray_raybooth_batch_images                      | histogram | task        |
| ray_raybooth_queue_seconds                     | histogram | task        |
| ray_raybooth_inference_seconds                 | histogram | task        |
| ray_raybooth_subject_loads_total               | counter   | task        |
| ray_raybooth_http_requests_total               | counter   | route, status |
| ray_raybooth_http_request_seconds              | histogram | route       |
"""

from __future__ import annotations

from ray.serve import metrics

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]


class ModelMetrics:
    def __init__(self, task: str):
        self.task = task
        self.images = metrics.Counter(
            "raybooth_images_generated", description="Images generated.", tag_keys=("task", "model")
        )
        self.batch_images = metrics.Histogram(
            "raybooth_batch_images",
            description="Images in each Serve batch (all groups together).",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("task",),
        )
        self.queue_seconds = metrics.Histogram(
            "raybooth_queue_seconds",
            description="From a request's arrival at the replica to the start of its pipeline call.",
            boundaries=SECONDS_BOUNDARIES,
            tag_keys=("task",),
        )
        self.inference_seconds = metrics.Histogram(
            "raybooth_inference_seconds",
            description="Duration of one pipeline call (a group of a batch).",
            boundaries=SECONDS_BOUNDARIES,
            tag_keys=("task",),
        )
        self.subject_loads = metrics.Counter(
            "raybooth_subject_loads", description="LoRA subjects loaded onto a replica.", tag_keys=("task",)
        )

    def batch(self, images: int) -> None:
        self.batch_images.observe(images, tags={"task": self.task})

    def group(self, model: str, images: int, queue_s: list[float], inference_s: float) -> None:
        self.images.inc(images, tags={"task": self.task, "model": model})
        self.inference_seconds.observe(inference_s, tags={"task": self.task})
        for q in queue_s:
            self.queue_seconds.observe(q, tags={"task": self.task})


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "raybooth_http_requests", description="HTTP requests by route and status.",
            tag_keys=("route", "status"),
        )
        self.latency = metrics.Histogram(
            "raybooth_http_request_seconds", description="HTTP request latency at the ingress.",
            boundaries=SECONDS_BOUNDARIES, tag_keys=("route",),
        )

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})
