"""What the server may serve: the public names a request's `model` field can take, and where each
one runs (which deployment, which LoRA subject on it).

The ingress looks a requested name up here before anything else sees it, so a name that is not
configured never reaches a loader, a path or the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raybooth.platform.errors import ModelError
from raybooth.serve_apps.settings import AppArgs, deployment_name


@dataclass(frozen=True)
class Route:
    name: str  # the public name
    task: str
    deployment: str  # the Serve deployment that runs it
    base: str  # public name of the deployment's base model
    subject: str | None = None  # a LoRA subject on that base (the multiplexed model id)

    def card(self) -> dict[str, Any]:
        # No paths or registry URIs: those say more about the server than a client needs.
        return {
            "id": self.name,
            "object": "model",
            "task": self.task,
            "kind": "subject" if self.subject else "model",
            "base_model": self.base,
            "deployment": self.deployment,
        }


class Catalog:
    """Public names per task; the first model of each task is that task's default."""

    def __init__(self, args: AppArgs):
        self.routes: dict[str, dict[str, Route]] = {}
        self.defaults: dict[str, str | None] = {}
        for task, specs in args.by_task().items():
            table: dict[str, Route] = {}
            for i, spec in enumerate(specs):
                dep = deployment_name(task, i, spec)
                name = spec.name or spec.model
                table[name] = Route(name=name, task=task, deployment=dep, base=name)
                for subject in spec.subjects:
                    table[subject] = Route(name=subject, task=task, deployment=dep, base=name, subject=subject)
            self.routes[task] = table
            self.defaults[task] = (specs[0].name or specs[0].model) if specs else None

    def resolve(self, task: str, requested: str | None) -> Route:
        table = self.routes.get(task, {})
        if requested is None or requested == "":
            default = self.defaults.get(task)
            if default is None:
                raise ModelError(f"this server has no model for {task}", field="model")
            return table[default]
        if not isinstance(requested, str) or requested not in table:
            known = ", ".join(sorted(table)) or "(none)"
            shown = requested if isinstance(requested, str) and len(requested) <= 80 else "(the given name)"
            other = [t for t, names in self.routes.items() if t != task and requested in names]
            hint = f" ({shown!r} is served for {other[0]}, not {task})" if other else ""
            raise ModelError(
                f"model {shown!r} is not served here{hint}; models for {task}: {known}", field="model"
            )
        return table[requested]

    def cards(self) -> list[dict[str, Any]]:
        return [route.card() for table in self.routes.values() for route in table.values()]
