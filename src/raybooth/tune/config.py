"""The sweep schema (configs/tune/*.yaml): which training config, which keys to sample and how,
when to stop a trial early, what "best" means, and how much each trial may take.

    base: configs/train/toy.yaml           # a training config (raybooth train --config ...)
    set: {train.max_steps: 200}            # fixed overrides of it, for every trial
    space: {train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}}   # raybooth.tune.space
    search: {algorithm: random, num_samples: 4, seed: 0}
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
    objective: {metric: "eval/clip_i + eval/clip_t", mode: max}
    max_concurrent_trials: 2
    scaling: {num_workers: 1, resources_per_worker: {CPU: 1}}      # per trial
    sweep: {name: my-sweep, storage_path: null}                    # null: <run.storage_path>/sweeps
    tracking: {register_as: null, alias: sweep-best}               # null: the base's register_as

`load_sweep` checks everything (the base config, the overrides, every space key) before Ray starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from raybooth.platform.config import (
    Section,
    TrainConfig,
    folder_name,
    load_config,
    read_yaml_mapping,
    validate_config,
    with_overrides,
)
from raybooth.platform.errors import ConfigError
from raybooth.tune.space import Dimension, check_space, grid_size, parse_space

OBJECTIVE_KEY = "objective"  # the metric name Tune and ASHA see


class SearchSection(Section):
    algorithm: Literal["random", "grid", "optuna"] = Field(
        default="random", description="random: sample num_samples points (grid keys multiply them); "
        "grid: every combination once (choice keys become grid keys); optuna: Optuna's TPE through "
        "Ray Tune, each new trial's values chosen from the objectives of the trials before it "
        "(num_samples trials; no grid keys)")
    num_samples: int = Field(default=4, ge=1)
    seed: int | None = Field(default=0, description="None: a different draw every sweep")


class SchedulerSection(Section):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(default=1, ge=1, description="reports (checkpoints) before a trial can be stopped")
    reduction_factor: float = Field(default=2.0, gt=1)
    max_t: int | None = Field(default=None, ge=1, description="reports of the longest trial (rungs end there); None: the base config's")


class ObjectiveSection(Section):
    metric: str = Field(default="loss", description="a reported metric, or a sum such as "
                        "'eval/clip_i + eval/clip_t' (terms may carry a weight: '0.5 * eval/dino')")
    mode: Literal["max", "min"] = "min"


class TrialScaling(Section):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="{}: 1 GPU with use_gpu, else 1 CPU (so trials can run side by side)")


class SweepSection(Section):
    name: str = "sweep"
    storage_path: str | None = Field(default=None, description="None: <base run.storage_path>/sweeps")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return folder_name(v)


class SweepTracking(Section):
    register_as: str | None = Field(default=None, description="None: the base config's tracking.register_as")
    alias: str = "sweep-best"


class SweepConfig(Section):
    base: str
    set: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Any]
    search: SearchSection = Field(default_factory=SearchSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    max_concurrent_trials: int = Field(default=2, ge=1)
    scaling: TrialScaling = Field(default_factory=TrialScaling)
    sweep: SweepSection = Field(default_factory=SweepSection)
    tracking: SweepTracking = Field(default_factory=SweepTracking)


# ---------------------------------------------------------------------------------------------
# The objective: a weighted sum of reported metrics

_TERM = re.compile(r"^\s*(?:([0-9.eE+-]+)\s*\*\s*)?([A-Za-z0-9_./-]+)\s*$")


@dataclass(frozen=True)
class Objective:
    terms: tuple[tuple[float, str], ...]  # (weight, metric)
    mode: str  # max | min

    @classmethod
    def parse(cls, section: ObjectiveSection) -> Objective:
        terms = []
        for part in section.metric.split("+"):
            m = _TERM.match(part)
            if not m:
                raise ConfigError(f"objective.metric: cannot read {part.strip()!r} in {section.metric!r}; "
                                  "write a metric name or a sum such as 'eval/clip_i + 0.5 * eval/clip_t'",
                                  field="objective.metric")
            terms.append((float(m.group(1) or 1.0), m.group(2)))
        return cls(terms=tuple(terms), mode=section.mode)

    @property
    def metrics(self) -> list[str]:
        return [name for _, name in self.terms]

    @property
    def worst(self) -> float:
        # Finite, so ASHA's percentile cut-offs stay numbers: a diverged (NaN/inf) trial is the
        # worst trial, and is stopped at its first rung.
        return -1e30 if self.mode == "max" else 1e30

    def value(self, metrics: dict[str, Any]) -> float | None:
        """The objective of one report; None when a term is not in it (e.g. no evaluation at this
        checkpoint); the worst value when a term is NaN or infinite (a diverged trial)."""
        total = 0.0
        for weight, name in self.terms:
            v = metrics.get(name)
            if v is None:
                return None
            v = float(v)
            if not math.isfinite(v):
                return self.worst
            total += weight * v
        return total if math.isfinite(total) else self.worst

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


# ---------------------------------------------------------------------------------------------
# Loading and checking


@dataclass(frozen=True)
class LoadedSweep:
    """A checked sweep: its config, the base training config with `set` applied, the space."""

    source: str
    config: SweepConfig
    base: TrainConfig
    dims: list[Dimension]
    objective: Objective

    @property
    def sweep_dir(self) -> Path:
        root = self.config.sweep.storage_path or str(Path(self.base.run.storage_path) / "sweeps")
        return (Path(root).expanduser() / self.config.sweep.name).resolve()

    @property
    def reports_per_trial(self) -> int:
        t = self.base.train
        return len([s for s in range(1, t.max_steps + 1) if s % t.checkpoint_every == 0 or s == t.max_steps])

    @property
    def register_as(self) -> str | None:
        return self.config.tracking.register_as or self.base.tracking.register_as

    @property
    def num_trials(self) -> int:
        if self.config.search.algorithm == "grid":
            return grid_size(self.dims)
        return self.config.search.num_samples * grid_size(self.dims)


def _base_path(base: str, sweep_file: Path | None) -> Path:
    p = Path(base).expanduser()
    if p.is_absolute() or p.is_file() or sweep_file is None:
        return p
    beside = sweep_file.parent / p
    return beside if beside.is_file() else p


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> LoadedSweep:
    """Read and check a sweep file; `overrides` (`--set KEY=VALUE`) apply to the base training
    config. Raises ConfigError naming the file and field; starts nothing."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep config")
    config = validate_config(data, SweepConfig, str(path))
    return check_sweep(config, str(path), overrides, sweep_file=path)


def check_sweep(config: SweepConfig, source: str, overrides: list[str] | None = None,
                sweep_file: Path | None = None) -> LoadedSweep:
    base_file = _base_path(config.base, sweep_file)
    base = load_config(base_file, list(overrides or []))
    try:
        base = with_overrides(base, dict(config.set))
    except ConfigError as exc:
        raise ConfigError(f"{source}: set: {exc.message}", field=f"set.{exc.field}") from None
    dims = parse_space(config.space)
    try:
        check_space(base, dims)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}", field=exc.field) from None
    if config.search.algorithm == "grid":
        loose = [d.key for d in dims if d.kind not in ("grid", "choice")]
        if loose:
            raise ConfigError(f"{source}: search.algorithm grid needs a list of values for every key; "
                              f"{', '.join(loose)} is a continuous distribution (use grid or choice, "
                              "or search.algorithm random)", field=f"space.{loose[0]}")
        dims = [Dimension(d.key, "grid", d.args) for d in dims]
    if config.search.algorithm == "optuna":
        fixed = [d.key for d in dims if d.kind == "grid"]
        if fixed:
            raise ConfigError(f"{source}: search.algorithm optuna chooses every value itself; space.{fixed[0]} is a "
                              "grid (use choice for a list of values, or search.algorithm grid/random)",
                              field=f"space.{fixed[0]}")
    objective = Objective.parse(config.objective)
    evaluated = [m for m in objective.metrics if m.startswith("eval/")]
    ev = base.evaluation
    if evaluated and (ev is None or not ev.every):
        raise ConfigError(
            f"{source}: objective.metric {config.objective.metric!r} uses {evaluated[0]}, which "
            "training reports only with evaluation during training: give the base config an "
            "evaluation: section with evaluation.every (a multiple of train.checkpoint_every), "
            "e.g. set: {evaluation.every: 100}", field="objective.metric")
    _check_evaluated_names(source, config.objective.metric, evaluated, base)
    return LoadedSweep(source=source, config=config, base=base, dims=dims, objective=objective)


def _check_evaluated_names(source: str, metric: str, evaluated: list[str], base: TrainConfig) -> None:
    """eval/* terms must be what evaluation during training reports for this base config."""
    from raybooth.jobs.evaluate.report import CLIP_I, CLIP_T, DINO
    from raybooth.jobs.evaluate.toy_scores import TOY_PROMPT, TOY_SUBJECT, training_is_toy_based
    from raybooth.jobs.evaluate.training import METRIC_PREFIX

    paper = {f"{METRIC_PREFIX}{m}" for m in (DINO, CLIP_I, CLIP_T)}
    toy = {f"{METRIC_PREFIX}{m}" for m in (TOY_SUBJECT, TOY_PROMPT)}
    for name in evaluated:
        if name in paper:
            continue
        if name in toy:
            ev = base.evaluation
            if not training_is_toy_based(base.model, ev.prompt_set, ev.prompts is not None):
                raise ConfigError(
                    f"{source}: objective.metric {metric!r} uses {name}, the toy judge's score, which "
                    f"only a toy-based model reports (model: toy, or evaluation.prompt_set: toy); "
                    f"the base model is {base.model!r}: use eval/dino, eval/clip_i or eval/clip_t",
                    field="objective.metric")
            continue
        raise ConfigError(
            f"{source}: objective.metric {metric!r} uses {name}, which evaluation does not report; "
            f"the evaluation metrics are {', '.join(sorted(paper | toy))}", field="objective.metric")
