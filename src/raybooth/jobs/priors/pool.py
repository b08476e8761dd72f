"""A pool of Ray actors that stays busy until every block of work is done.

Work is a set of blocks ({key: payload}); an actor method turns one block into a result. Each
actor holds up to `depth` blocks in flight (its calls run one after another), so it starts the
next batch while the driver is still handling the last one. When an actor dies (node lost, OOM,
`ray.kill`), its outstanding blocks go back to the front of the queue and a fresh actor takes its
slot; a block is only ever returned by one successful call, so nothing is lost or produced twice.

`ActorPool` is the machinery (any actor class with a `ready()` method and a work method);
`PriorPool` is it over `ClassImageActor` for class images. The evaluation job
(raybooth.jobs.evaluate) runs its generate-and-embed actors on the same pool.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from raybooth.jobs.priors.actor import ActorPlan, ClassImageActor
from raybooth.jobs.priors.spec import PriorSpec
from raybooth.platform.config import ModelOptions
from raybooth.platform.errors import UserError

ResultHandler = Callable[[Any], None]


class PriorGenerationError(RuntimeError):
    """The pool cannot finish: actors keep dying or cannot load the model."""


# The name a shared pool's callers know the error by.
ActorPoolError = PriorGenerationError


@dataclass
class _Slot:
    actor: Any
    generation: int = 0  # bumped on replacement: errors from an older actor must not replace twice
    blocks: list[int] = field(default_factory=list)  # blocks in flight on this actor


class ActorPool:
    """Actors of one class, each built with the same arguments, kept busy with blocks of work.

    `what` names the actors in errors ("class-image"); `model_ref` is what they load; an
    out-of-memory error in a call becomes a UserError with `oom_advice` naming `oom_field`.
    """

    def __init__(
        self,
        actor_class: type,
        args: tuple,
        plan: ActorPlan,
        *,
        method: str,
        what: str,
        model_ref: str,
        oom_advice: str,
        oom_field: str,
        depth: int = 2,
        max_replacements: int | None = None,
    ):
        self.args = args
        self.plan = plan
        self.method = method
        self.what = what
        self.model_ref = model_ref
        self.oom_advice = oom_advice
        self.oom_field = oom_field
        self.depth = max(1, depth)
        self.max_replacements = (
            max_replacements if max_replacements is not None else 2 * plan.num_actors + 2
        )
        self.replacements = 0
        self._remote = ray.remote(actor_class)
        self.slots = [_Slot(actor=self._start()) for _ in range(plan.num_actors)]

    # ------------------------------------------------------------------ actors

    def _start(self) -> Any:
        # "DEFAULT" scheduling: a pool started inside a placement group (a Ray Tune trial's, which
        # holds a token CPU) would otherwise be captured by it and never fit.
        return self._remote.options(
            num_cpus=self.plan.num_cpus, num_gpus=self.plan.num_gpus, scheduling_strategy="DEFAULT"
        ).remote(*self.args)

    def _replace(self, slot: _Slot, cause: BaseException) -> None:
        if self.replacements >= self.max_replacements:
            raise PriorGenerationError(
                f"{self.what} actors died {self.replacements + 1} times; giving up. Last error: "
                f"{_first_line(cause)}"
            )
        self.replacements += 1
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass
        slot.actor = self._start()
        slot.generation += 1

    @property
    def actors(self) -> list[Any]:
        return [slot.actor for slot in self.slots]

    def busy_actors(self) -> list[Any]:
        """Actors holding work right now (what a fault-injection test kills)."""
        return [slot.actor for slot in self.slots if slot.blocks]

    def wait_ready(self) -> list[dict[str, Any]]:
        """Block until every actor has loaded its model (the benchmark times loading apart)."""
        return ray.get([slot.actor.ready.remote() for slot in self.slots])

    def shutdown(self) -> None:
        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        self.slots = []

    # ------------------------------------------------------------------ work

    def run(self, work: dict[Any, Any], on_result: ResultHandler) -> None:
        """Call the work method on every block in `work` ({key: payload}, as
        `method(key, payload)`); call `on_result` on the driver with each block's result as it
        arrives."""
        pending = collections.deque(sorted(work))
        inflight: dict[Any, tuple[_Slot, int, int]] = {}  # ref -> (slot, generation, block)

        def fill() -> None:
            # Round-robin one block at a time, so every actor gets work before any gets two.
            for _ in range(self.depth):
                for slot in self.slots:
                    if pending and len(slot.blocks) < self.depth:
                        block = pending.popleft()
                        ref = getattr(slot.actor, self.method).remote(block, work[block])
                        inflight[ref] = (slot, slot.generation, block)
                        slot.blocks.append(block)

        fill()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            slot, generation, block = inflight.pop(ref)
            try:
                results = ray.get(ref)
            except RayActorError as exc:
                if _creation_failed(exc):
                    raise PriorGenerationError(
                        f"a {self.what} actor could not load model {self.model_ref!r}: "
                        f"{_first_line(exc)}"
                    ) from None
                if block in slot.blocks:
                    slot.blocks.remove(block)
                pending.appendleft(block)
                if generation == slot.generation:
                    # This actor's other blocks fail the same way and are requeued as they come.
                    self._replace(slot, exc)
                    slot.blocks.clear()
                fill()
                continue
            except RayTaskError as exc:
                if isinstance(exc.cause, UserError):
                    raise exc.cause from None
                if "out of memory" in str(exc).lower():
                    raise UserError(
                        f"{self.what} generation ran out of memory ({_first_line(exc.cause or exc)}): "
                        f"{self.oom_advice}",
                        field=self.oom_field,
                    ) from None
                raise
            if block in slot.blocks:
                slot.blocks.remove(block)
            on_result(results)
            fill()


class PriorPool(ActorPool):
    """Class-image actors (`ClassImageActor.generate(block, keep)` -> [(index, png bytes)])."""

    def __init__(
        self,
        spec: PriorSpec,
        options: ModelOptions,
        plan: ActorPlan,
        *,
        depth: int = 2,
        max_replacements: int | None = None,
    ):
        self.spec = spec
        self.options = options
        super().__init__(
            ClassImageActor,
            (spec, options),
            plan,
            method="generate",
            what="class-image",
            model_ref=spec.model_ref,
            oom_advice="lower priors.batch_size, or give each actor a whole GPU (priors.gpus_per_actor: 1)",
            oom_field="priors.batch_size",
            depth=depth,
            max_replacements=max_replacements,
        )


def _creation_failed(exc: RayActorError) -> bool:
    # The actor's __init__ raised something unexpected: a replacement would fail the same way.
    return bool(getattr(exc, "actor_init_failed", False))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
