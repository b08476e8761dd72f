"""Evaluation actors on the class-image machinery: `plan_actors` decides how many (one per GPU,
else as many as the free CPUs hold), `ActorPool` keeps them busy and replaces one that dies."""

from __future__ import annotations

from raybooth.jobs.evaluate.actor import EvalActor, EvalSpec
from raybooth.jobs.priors.actor import ActorPlan, plan_actors
from raybooth.jobs.priors.pool import ActorPool, ActorPoolError
from raybooth.platform.config import ModelOptions

__all__ = ["EvalPool", "ActorPlan", "ActorPoolError", "plan_actors"]


class EvalPool(ActorPool):
    """`EvalActor.run(key, task)` -> [EmbeddedImage] on a pool of Ray actors."""

    def __init__(self, spec: EvalSpec, options: ModelOptions, plan: ActorPlan, *, depth: int = 2):
        self.spec = spec
        super().__init__(
            EvalActor,
            (spec, options),
            plan,
            method="run",
            what="model-evaluation",
            model_ref=spec.model_ref,
            oom_advice="lower evaluation.batch_size, or give each actor a whole GPU (evaluation.gpus_per_actor: 1)",
            oom_field="evaluation.batch_size",
            depth=depth,
        )
