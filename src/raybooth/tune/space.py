"""The search space: dotted training keys mapped to distributions, written in YAML as

    space:
      train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
      train.prior_loss_weight: {uniform: [0.5, 1.5]}
      train.lora_rank: {choice: [4, 8, 16]}
      train.max_steps: {randint: [200, 801]}        # high excluded, as in Ray Tune
      train.train_text_encoder: {grid: [true, false]}

Every key and every value a distribution can produce (the choices, the bounds) is checked against
the training schema here, on the driver, before Ray starts: a typo or a value of the wrong type is
one `ConfigError` naming `space.<key>`, not a trial that fails twenty minutes later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raybooth.platform.config import TrainConfig, with_overrides
from raybooth.platform.errors import ConfigError

# name -> what its argument is
KINDS = {
    "loguniform": "[low, high], low > 0",
    "uniform": "[low, high]",
    "randint": "[low, high] integers, high excluded",
    "choice": "a list of values",
    "grid": "a list of values (every one is tried; multiplies num_samples)",
}
# What the sweep itself sets for every trial: a space cannot sample them.
SWEEP_OWNED = ("run.name", "run.storage_path", "run.resume_from", "scaling.", "tracking.")


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted training key, e.g. "train.learning_rate"
    kind: str  # one of KINDS
    args: tuple[Any, ...]

    def candidates(self) -> list[Any]:
        """The values to check against the schema: the bounds, or every choice."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def to_tune(self):
        from ray import tune

        a = self.args
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "randint":
            return tune.randint(a[0], a[1])
        if self.kind == "choice":
            return tune.choice(list(a))
        return tune.grid_search(list(a))

    def to_json(self) -> dict[str, Any]:
        return {self.kind: list(self.args)}


def _fail(key: str, why: str) -> ConfigError:
    return ConfigError(f"space.{key}: {why}", field=f"space.{key}")


def parse_dimension(key: str, spec: Any) -> Dimension:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(key, "write one distribution as a mapping, e.g. {loguniform: [1.0e-5, 1.0e-3]}; "
                         "known: " + "; ".join(f"{k} ({v})" for k, v in KINDS.items()))
    (kind, args), = spec.items()
    if kind not in KINDS:
        raise _fail(key, f"unknown distribution {kind!r}; known: " + ", ".join(KINDS))
    if not isinstance(args, list) or not args:
        raise _fail(key, f"{kind} takes {KINDS[kind]} (got {args!r})")
    if kind in ("loguniform", "uniform", "randint"):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)
        if len(args) != 2 or not numeric or not args[0] < args[1]:
            raise _fail(key, f"{kind} takes {KINDS[kind]} with low < high (got {args!r})")
        if kind == "loguniform" and args[0] <= 0:
            raise _fail(key, f"loguniform needs low > 0 (got {args[0]!r})")
        if kind == "randint" and not all(isinstance(v, int) for v in args):
            raise _fail(key, f"randint takes integer bounds (got {args!r})")
        if not all(math.isfinite(float(v)) for v in args):
            raise _fail(key, f"bounds must be finite (got {args!r})")
    return Dimension(key=key, kind=kind, args=tuple(args))


def parse_space(raw: Any) -> list[Dimension]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("space: map at least one dotted training key to a distribution, e.g. "
                          "space: {train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}}", field="space")
    return [parse_dimension(str(k), v) for k, v in raw.items()]


def check_space(base: TrainConfig, dims: list[Dimension]) -> None:
    """Each key exists in the training schema and each candidate value fits its field (the base
    config with that one value set still validates)."""
    for dim in dims:
        if any(dim.key == p or (p.endswith(".") and dim.key.startswith(p)) for p in SWEEP_OWNED):
            raise _fail(dim.key, "the sweep sets this for every trial (its run folder, name, scaling "
                                 "and tracking); sweep a training key instead, e.g. train.learning_rate")
        for value in dim.candidates():
            try:
                with_overrides(base, {dim.key: value})
            except ConfigError as exc:
                raise _fail(dim.key, f"{dim.kind} value {value!r} does not fit the training schema: "
                                     f"{exc.message}") from None


def tune_space(dims: list[Dimension]) -> dict[str, Any]:
    """Ray Tune's param_space: the dotted keys stay flat (a trial sets them with with_overrides)."""
    return {d.key: d.to_tune() for d in dims}


def grid_size(dims: list[Dimension]) -> int:
    n = 1
    for d in dims:
        if d.kind == "grid":
            n *= len(d.args)
    return n
