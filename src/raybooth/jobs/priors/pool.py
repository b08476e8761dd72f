"""A pool of class-image actors that stays busy until every block of work is done.

Work is a set of index blocks. Each actor holds up to `depth` blocks in flight (its calls run one
after another), so it starts the next batch while the driver is still writing the last one. When
an actor dies (node lost, OOM, `ray.kill`), its outstanding blocks go back to the front of the
queue and a fresh actor takes its slot; a block is only ever returned by one successful call, so
nothing is lost or produced twice.
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

ResultHandler = Callable[[list[tuple[int, bytes]]], None]


class PriorGenerationError(RuntimeError):
    """The pool cannot finish: actors keep dying or cannot load the model."""


@dataclass
class _Slot:
    actor: Any
    generation: int = 0  # bumped on replacement: errors from an older actor must not replace twice
    blocks: list[int] = field(default_factory=list)  # blocks in flight on this actor


class PriorPool:
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
        self.plan = plan
        self.depth = max(1, depth)
        self.max_replacements = (
            max_replacements if max_replacements is not None else 2 * plan.num_actors + 2
        )
        self.replacements = 0
        self._remote = ray.remote(ClassImageActor)
        self.slots = [_Slot(actor=self._start()) for _ in range(plan.num_actors)]

    # ------------------------------------------------------------------ actors

    def _start(self) -> Any:
        return self._remote.options(
            num_cpus=self.plan.num_cpus, num_gpus=self.plan.num_gpus
        ).remote(self.spec, self.options)

    def _replace(self, slot: _Slot, cause: BaseException) -> None:
        if self.replacements >= self.max_replacements:
            raise PriorGenerationError(
                f"class-image actors died {self.replacements + 1} times; giving up. Last error: "
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

    def run(self, work: dict[int, list[int]], on_result: ResultHandler) -> None:
        """Generate every block in `work` ({block: indices to keep}); call `on_result` on the
        driver with each block's (index, png bytes) as it arrives."""
        pending = collections.deque(sorted(work))
        inflight: dict[Any, tuple[_Slot, int, int]] = {}  # ref -> (slot, generation, block)

        def fill() -> None:
            # Round-robin one block at a time, so every actor gets work before any gets two.
            for _ in range(self.depth):
                for slot in self.slots:
                    if pending and len(slot.blocks) < self.depth:
                        block = pending.popleft()
                        ref = slot.actor.generate.remote(block, work[block])
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
                        f"a class-image actor could not load model {self.spec.model_ref!r}: "
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
                        f"class-image generation ran out of memory ({_first_line(exc.cause or exc)}): "
                        "lower priors.batch_size, or give each actor a whole GPU "
                        "(priors.gpus_per_actor: 1)",
                        field="priors.batch_size",
                    ) from None
                raise
            if block in slot.blocks:
                slot.blocks.remove(block)
            on_result(results)
            fill()


def _creation_failed(exc: RayActorError) -> bool:
    # The actor's __init__ raised something unexpected: a replacement would fail the same way.
    return bool(getattr(exc, "actor_init_failed", False))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
