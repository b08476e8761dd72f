"""The application builder that Serve config files name:

    import_path: raybooth.serve_apps.app:build_app
    args: {text_to_image: [...], inpainting: [...], limits: {...}, auth: {...}}

`serve run`, `serve deploy`, `raybooth serve` and a KubeRay RayService all call it with the
config's `args`. Each configured model becomes its own deployment (its own replicas, autoscaling
and resources, set in the config's `deployments:` list by name); the ingress routes to them.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from raybooth.serve_apps.ingress import Ingress
from raybooth.serve_apps.deployments import Inpainting, TextToImage
from raybooth.serve_apps.settings import TEXT_TO_IMAGE, AppArgs, deployment_name, load_args


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    parsed = load_args(args)
    models: dict[str, Any] = {}
    for task, specs in parsed.by_task().items():
        deployment = TextToImage if task == TEXT_TO_IMAGE else Inpainting
        for index, spec in enumerate(specs):
            name = deployment_name(task, index, spec)
            models[name] = deployment.options(name=name).bind(spec.model_dump(), name)
    return Ingress.bind(parsed.model_dump(), models)
