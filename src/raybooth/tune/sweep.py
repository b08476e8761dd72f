"""`raybooth tune`, the driver: a Ray Tune sweep over the training job.

    check the sweep (raybooth.tune.config, .space)       before Ray starts
    -> Ray, with its dashboard (see `start_ray`)
    -> class images, once for every trial              raybooth.jobs.priors.job
    -> the sweep's MLflow parent run                   raybooth.tune.tracking
    -> Tuner(with_resources(run_trial, {"cpu": 0.01}), ...) .fit()   or Tuner.restore (--resume)
    -> sweep.json (a SweepResult), the plot, the best trial registered under its alias

Layout of a sweep folder `<storage>/<name>/`: `tune/` (Tune's experiment state, what --resume
restores), `trials/<trial id>/` (each trial's training run folder), `sweep.json`, `objective.png`,
`mlflow_run.json` (the parent run).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raybooth.jobs.train.driver import SUMMARY_FILE
from raybooth.jobs.train.inputs import with_absolute_paths
from raybooth.platform.errors import ConfigError, UserError, find_user_error
from raybooth.platform.paths import write_json_atomic
from raybooth.tune.config import OBJECTIVE_KEY, LoadedSweep
from raybooth.tune.trial import TRIALS_DIR, SweepContext, error_line, read_trial_error, run_trial, trial_config

log = logging.getLogger("raybooth.tune")

SWEEP_FILE = "sweep.json"
PLOT_FILE = "objective.png"
TUNE_DIR = "tune"
TRIAL_CPU = 0.01  # Tune's own share per trial: the TorchTrainer's workers hold the real resources

FINISHED, STOPPED, ERRORED, PENDING = "finished", "stopped", "errored", "pending"


# ---------------------------------------------------------------------------------------------
# What a sweep produced (sweep.json)


@dataclass(frozen=True)
class TrialRecord:
    trial_id: str
    config: dict[str, Any]  # the sampled values, dotted keys
    status: str  # finished | stopped (by the scheduler) | errored | pending
    iterations: int  # Tune results (checkpoint reports) the trial made
    final_objective: float | None
    best_objective: float | None
    mlflow_run_id: str | None
    run_dir: Path
    error: str | None = None

    @property
    def summary_path(self) -> Path:
        return self.run_dir / SUMMARY_FILE

    def to_json(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "config": dict(self.config), "status": self.status,
                "iterations": self.iterations, "final_objective": self.final_objective,
                "best_objective": self.best_objective, "mlflow_run_id": self.mlflow_run_id,
                "run_dir": str(self.run_dir), "error": self.error}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrialRecord:
        return cls(trial_id=d["trial_id"], config=dict(d["config"]), status=d["status"],
                   iterations=int(d["iterations"]), final_objective=d["final_objective"],
                   best_objective=d["best_objective"], mlflow_run_id=d["mlflow_run_id"],
                   run_dir=Path(d["run_dir"]), error=d["error"])


@dataclass(frozen=True)
class SweepResult:
    name: str
    sweep_dir: Path
    objective: str  # the metric expression
    mode: str
    space: dict[str, Any]  # key -> {distribution: args}
    search: dict[str, Any]
    scheduler: dict[str, Any]
    trials: list[TrialRecord]
    best_trial_id: str | None
    parent_run_id: str | None
    registered_model: str | None = None
    registered_version: str | None = None
    model_uri: str | None = None
    plot: Path | None = None
    wall_seconds: float | None = None
    resumed: bool = False

    @property
    def best(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.trial_id == self.best_trial_id), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "sweep_dir": str(self.sweep_dir), "objective": self.objective,
            "mode": self.mode, "space": self.space, "search": self.search, "scheduler": self.scheduler,
            "trials": [t.to_json() for t in self.trials], "best_trial_id": self.best_trial_id,
            "parent_run_id": self.parent_run_id, "registered_model": self.registered_model,
            "registered_version": self.registered_version, "model_uri": self.model_uri,
            "plot": None if self.plot is None else str(self.plot), "wall_seconds": self.wall_seconds,
            "resumed": self.resumed,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SweepResult:
        return cls(
            name=d["name"], sweep_dir=Path(d["sweep_dir"]), objective=d["objective"], mode=d["mode"],
            space=dict(d["space"]), search=dict(d["search"]), scheduler=dict(d["scheduler"]),
            trials=[TrialRecord.from_json(t) for t in d["trials"]], best_trial_id=d["best_trial_id"],
            parent_run_id=d["parent_run_id"], registered_model=d["registered_model"],
            registered_version=d["registered_version"], model_uri=d["model_uri"],
            plot=None if d["plot"] is None else Path(d["plot"]), wall_seconds=d["wall_seconds"],
            resumed=bool(d["resumed"]),
        )

    def write(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def read(cls, path: str | Path) -> SweepResult:
        return cls.from_json(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------
# Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(num_cpus: int | None = None) -> None:
    """Ray for a sweep, with its dashboard. Ray Train frees a stopped trial's placement group from
    a cleaner that asks the State API (served by the dashboard) whether the trial's controller is
    alive: without the dashboard the query fails, placement groups leak and later trials wait
    forever for workers. The cleaner is pointed at this instance's dashboard explicitly
    (RAY_API_SERVER_ADDRESS, inherited by every Ray process), so a second Ray instance on the same
    host does not confuse it. RAY_ADDRESS (a cluster) is used as it is: its dashboard runs."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, log_to_driver=False)


def check_state_api(timeout_s: float = 60.0) -> None:
    """The State API answers (see start_ray), or a UserError saying how to start Ray."""
    from ray.util.state import list_placement_groups

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            list_placement_groups(limit=1)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise UserError(
                    "Ray's State API does not answer (" + str(exc).splitlines()[0][:200] + "). Tune "
                    "needs it to free the resources of stopped trials: start Ray with its dashboard "
                    "(pip install 'ray[default]'; ray.init(include_dashboard=True) or `ray start "
                    "--head`), one Ray instance per host, or let `raybooth tune` start Ray itself",
                    field="ray") from None
            time.sleep(1.0)


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One line per trial event: running / done / stopped / errored, and the best so far (a Tune
    Callback; made by `progress_callback` so that importing this module does not import Ray)."""

    def __init__(self, sweep_dir: Path, mode: str):
        self.sweep_dir, self.mode = sweep_dir, mode
        self.best: tuple[float, str] | None = None
        self.running: set[str] = set()
        self.done = self.stopped = self.errored = 0

    def _line(self, event: str) -> None:
        best = "n/a" if self.best is None else f"{self.best[0]:.5g} ({self.best[1]})"
        print(f"tune: {event} | running {len(self.running)}, done {self.done}, stopped "
              f"{self.stopped}, errored {self.errored} | best {best}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._line(f"trial {trial.trial_id} started {trial.config}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(OBJECTIVE_KEY)
        if value is not None and math.isfinite(value) and abs(value) < 1e29:
            if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
                self.best = (float(value), trial.trial_id)
        shown = "n/a" if value is None else format(value, ".5g")
        self._line(f"trial {trial.trial_id} report {result.get('training_iteration')}: objective {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        reports = (trial.last_result or {}).get("training_iteration", 0)
        if (self.sweep_dir / TRIALS_DIR / trial.trial_id / SUMMARY_FILE).is_file():
            self.done += 1
            self._line(f"trial {trial.trial_id} done after {reports} report(s)")
        else:
            self.stopped += 1
            self._line(f"trial {trial.trial_id} stopped by the scheduler after {reports} report(s)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.errored += 1
        why = read_trial_error(self.sweep_dir / TRIALS_DIR / trial.trial_id)
        self._line(f"trial {trial.trial_id} errored" + (f": {why}" if why else ""))


class _UserErrorTracebacks(logging.Filter):
    """Ray Tune logs every failed trial with its traceback. A trial that failed on a user error
    (training diverged, a bad input) is explained in one line by Progress instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or find_user_error(exc) is None


def progress_callback(sweep_dir: Path, mode: str):
    from ray.tune import Callback

    tune_log = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, _UserErrorTracebacks) for f in tune_log.filters):
        tune_log.addFilter(_UserErrorTracebacks())
    return type("SweepProgress", (Progress, Callback), {})(sweep_dir, mode)


# ---------------------------------------------------------------------------------------------
# The sweep


def _scheduler(loaded: LoadedSweep):
    s = loaded.config.scheduler
    if s.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # ASHA stops a trial when it reaches max_t; one more than the reports a full trial makes, so
    # a trial that survives every rung finishes its own way (exports its model, writes summary.json)
    # instead of being cut at its last checkpoint.
    max_t = (s.max_t or loaded.reports_per_trial) + 1
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def _trainable(ctx: SweepContext, loaded: LoadedSweep):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": TRIAL_CPU})


def _context(loaded: LoadedSweep, sweep_dir: Path, parent_run_id: str | None) -> SweepContext:
    # Trials run in their own folders (Ray Tune changes a trial's working directory), so the
    # base config's relative paths are made absolute here, where they were written.
    return SweepContext(
        base=with_absolute_paths(loaded.base).model_dump(mode="json"), sweep_dir=str(sweep_dir),
        sweep_name=loaded.config.sweep.name, objective=loaded.objective,
        scaling=loaded.config.scaling.model_dump(), parent_run_id=parent_run_id,
        register_as=loaded.register_as,
    )


def _sweep_params(loaded: LoadedSweep) -> dict[str, Any]:
    c = loaded.config
    params: dict[str, Any] = {f"space.{d.key}": json.dumps(d.to_json()) for d in loaded.dims}
    params |= {f"search.{k}": v for k, v in c.search.model_dump().items()}
    params |= {f"scheduler.{k}": v for k, v in c.scheduler.model_dump().items()}
    params |= {"objective.metric": c.objective.metric, "objective.mode": c.objective.mode,
               "max_concurrent_trials": c.max_concurrent_trials, "base": c.base,
               "scaling": json.dumps(c.scaling.model_dump())}
    params |= {f"set.{k}": json.dumps(v) for k, v in c.set.items()}
    return params


def _records(loaded: LoadedSweep, sweep_dir: Path, grid) -> list[TrialRecord]:
    from raybooth.platform.mlflow.runs import read_run_record

    mode, out = loaded.objective.mode, []
    for result in grid:
        trial_id = Path(result.path).name.split("_", 1)[-1] if result.path else "?"
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id", trial_id)
        run_dir = sweep_dir / TRIALS_DIR / trial_id
        history = result.metrics_dataframe
        values: list[float] = []
        if history is not None and OBJECTIVE_KEY in history:
            values = [float(v) for v in history[OBJECTIVE_KEY].dropna()]
        best = (max(values) if mode == "max" else min(values)) if values else None
        if result.error is not None:
            status = ERRORED
        elif (run_dir / SUMMARY_FILE).is_file():
            status = FINISHED
        elif metrics.get("done") or metrics.get("training_iteration"):
            status = STOPPED
        else:
            status = PENDING
        record = read_run_record(run_dir)
        sampled = {k: v for k, v in (result.config or {}).items()}
        out.append(TrialRecord(
            trial_id=trial_id, config=sampled, status=status,
            iterations=int(metrics.get("training_iteration") or 0),
            final_objective=values[-1] if values else None, best_objective=best,
            mlflow_run_id=record.run_id if record else None, run_dir=run_dir,
            error=None if result.error is None else error_line(result.error),
        ))
    return sorted(out, key=lambda t: t.trial_id)


def search_algorithm(loaded: LoadedSweep):
    """Ray Tune's search algorithm for `search:`, limited to max_concurrent_trials at a time.
    random/grid: the variant generator (grid keys expand, the rest sampled with the seed);
    optuna: Optuna's TPE sampler (seeded), which picks each trial's values from the results so far."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    search, limit = loaded.config.search, loaded.config.max_concurrent_trials
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=search.seed), max_concurrent=limit)
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=limit)


def _pick_best(loaded: LoadedSweep, trials: list[TrialRecord]) -> TrialRecord | None:
    """The best finished trial by its final objective (a finished trial has a model to register)."""
    best = None
    for t in trials:
        if t.status != FINISHED or t.final_objective is None:
            continue
        if best is None or loaded.objective.better(t.final_objective, best.final_objective):
            best = t
    return best


def plot_objective(result_trials: list[TrialRecord], keys: list[str], objective: str, path: Path) -> Path | None:
    """Objective (final, per trial) against each swept key, one panel per key; stopped trials
    hollow, so a reader sees what the scheduler cut; errored ones as crosses on the bottom edge."""
    points = [t for t in result_trials if t.final_objective is not None and abs(t.final_objective) < 1e29]
    if not points or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for status, style in ((FINISHED, dict(c="tab:blue")), (STOPPED, dict(facecolors="none", edgecolors="tab:red"))):
            xs = [t.config.get(key) for t in points if t.status == status]
            ys = [t.final_objective for t in points if t.status == status]
            if xs:
                xs = [float(x) if isinstance(x, (int, float)) else str(x) for x in xs]
                ax.scatter(xs, ys, label=status, **style)
        # Errored trials have no objective: marked on the bottom edge, so the x they failed at shows.
        failed = [float(x) if isinstance(x, (int, float)) else str(x)
                  for x in (t.config.get(key) for t in result_trials if t.status == ERRORED)]
        if failed:
            low = min(t.final_objective for t in points)
            ax.scatter(failed, [low] * len(failed), marker="x", c="tab:gray", label="errored (no objective)")
        values = [t.config.get(key) for t in result_trials if t.status in (FINISHED, STOPPED, ERRORED)]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values) and \
                max(values) / max(min(values), 1e-300) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _register_best(loaded: LoadedSweep, best: TrialRecord, sweep_name: str, parent_run_id: str | None,
                   ctx: SweepContext):
    from raybooth.jobs.train.handoff import TrainingSummary
    from raybooth.jobs.train.register import register_training
    from raybooth.tune.tracking import tag_version

    summary = TrainingSummary.read(best.summary_path)
    if summary.mlflow_run_id is None or not loaded.register_as:
        return None
    config = trial_config(ctx, best.config, best.trial_id)
    config = config.model_copy(update={"tracking": config.tracking.model_copy(
        update={"register_as": loaded.register_as, "alias": loaded.config.tracking.alias})})
    registration = register_training(config, summary)
    if registration.registered_model and registration.registered_version:
        tag_version(config.tracking.tracking_uri, registration.registered_model, registration.registered_version, {
            "sweep": sweep_name, "sweep.parent_run_id": str(parent_run_id), "sweep.trial_id": best.trial_id,
            "sweep.objective": loaded.config.objective.metric,
            "sweep.objective_value": f"{best.final_objective:.6g}",
            "sweep.config": json.dumps(best.config, sort_keys=True),
        })
    return registration


def run_sweep(loaded: LoadedSweep, *, resume: bool = False, num_cpus: int | None = None) -> SweepResult:
    """Run (or with `resume`, continue) the sweep; returns what sweep.json holds."""
    started = time.perf_counter()
    sweep_dir = loaded.sweep_dir
    tune_dir = sweep_dir / TUNE_DIR
    name = loaded.config.sweep.name
    from ray.tune import Tuner

    if resume and not Tuner.can_restore(str(tune_dir)):
        raise ConfigError(f"--resume: {sweep_dir} has no sweep to continue (no Tune state in {tune_dir}); "
                          "run without --resume to start it", field="--resume")
    if not resume and tune_dir.exists():
        raise ConfigError(f"sweep {name!r} already exists in {sweep_dir}: continue it with --resume, or "
                          "start another with sweep.name set to a new name", field="sweep.name")

    # Checked before any worker starts: the inputs of a trial config (photos, model, resume).
    from raybooth.jobs.train.inputs import (
        check_inputs,
        check_placement,
        worker_resources,
    )

    probe = trial_config(_context(loaded, sweep_dir, None), {d.key: d.candidates()[0] for d in loaded.dims}, "probe")
    check_inputs(probe)
    if probe.evaluation is not None:
        from raybooth.jobs.evaluate.training import check_training_evaluation

        check_training_evaluation(probe)

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # evaluation is not in every report
    start_ray(num_cpus)
    check_state_api()
    check_placement(probe, worker_resources(probe))
    print(f"tune: sweep {name} in {sweep_dir}: {loaded.num_trials} trial(s), {loaded.config.max_concurrent_trials} "
          f"at a time, each {probe.scaling.num_workers} worker(s) x {worker_resources(probe)}; objective "
          f"{loaded.config.objective.metric} ({loaded.objective.mode})", flush=True)

    if loaded.base.priors.enabled:
        # Once for the sweep: the content-addressed set is then found (not regenerated) by every trial.
        from raybooth.jobs.priors.job import ensure_class_images

        class_set = ensure_class_images(loaded.base, progress=True)
        print(f"tune: class images {class_set.identity} ready ({len(class_set.images)})", flush=True)

    from raybooth.tune.tracking import (
        close_child_run,
        log_table,
        results_table,
        start_parent_run,
    )

    sweep_dir.mkdir(parents=True, exist_ok=True)
    parent = start_parent_run(loaded.base, sweep_dir, name=name, params=_sweep_params(loaded),
                              tags={"raybooth.sweep.objective": loaded.config.objective.metric}, resume=resume)
    if parent.enabled:
        print(f"tune: MLflow parent run {parent.run_id}{' (continued)' if parent.reused else ''}", flush=True)
    ctx = _context(loaded, sweep_dir, parent.run_id)
    trainable = _trainable(ctx, loaded)

    from ray import tune

    callbacks = [progress_callback(sweep_dir, loaded.objective.mode)]
    try:
        if resume:
            tuner = Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
        else:
            from raybooth.tune.space import tune_space

            search = loaded.config.search
            tuner = Tuner(
                trainable,
                param_space=tune_space(loaded.dims),
                tune_config=tune.TuneConfig(
                    metric=OBJECTIVE_KEY, mode=loaded.objective.mode,
                    scheduler=_scheduler(loaded),
                    search_alg=search_algorithm(loaded),
                    num_samples=1 if search.algorithm == "grid" else search.num_samples,
                    reuse_actors=False,
                ),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir), callbacks=callbacks,
                                          verbose=0, failure_config=tune.FailureConfig(max_failures=0)),
            )
        # A restored Tuner keeps its RunConfig, callbacks included (they are part of its state).
        grid = tuner.fit()
        trials = _records(loaded, sweep_dir, grid)
        for t in trials:
            if t.status in (STOPPED, ERRORED, PENDING):
                close_child_run(loaded.base.tracking.tracking_uri, t.mlflow_run_id,
                                "KILLED" if t.status == STOPPED else "FAILED")
        best = _pick_best(loaded, trials)
        registration = _register_best(loaded, best, name, parent.run_id, ctx) if best and parent.enabled else None
        plot = plot_objective(trials, [d.key for d in loaded.dims], loaded.config.objective.metric,
                              sweep_dir / PLOT_FILE)
        result = SweepResult(
            name=name, sweep_dir=sweep_dir, objective=loaded.config.objective.metric,
            mode=loaded.objective.mode, space={d.key: d.to_json() for d in loaded.dims},
            search=loaded.config.search.model_dump(), scheduler=loaded.config.scheduler.model_dump(),
            trials=trials, best_trial_id=best.trial_id if best else None, parent_run_id=parent.run_id,
            registered_model=registration.registered_model if registration else None,
            registered_version=registration.registered_version if registration else None,
            model_uri=registration.model_uri if registration else None, plot=plot,
            wall_seconds=round(time.perf_counter() - started, 2), resumed=resume,
        )
        result.write(sweep_dir / SWEEP_FILE)
        if parent.enabled:
            counts = {s: sum(t.status == s for t in trials) for s in (FINISHED, STOPPED, ERRORED)}
            parent.log_metrics({f"trials_{k}": float(v) for k, v in counts.items()}, step=0)
            if best is not None:
                parent.log_metrics({"best_objective": best.final_objective}, step=0)
                parent.set_tags({"raybooth.sweep.best_trial": best.trial_id,
                                 "raybooth.sweep.best_run_id": str(best.mlflow_run_id),
                                 "raybooth.sweep.best_config": json.dumps(best.config, sort_keys=True)})
            if result.model_uri:
                parent.set_tags({"raybooth.sweep.model_uri": result.model_uri})
            parent.log_artifact(sweep_dir / SWEEP_FILE)
            if plot is not None:
                parent.log_artifact(plot, "plots")
            parent.flush()
            log_table(parent, results_table(trials), "trials.json")
            parent.end("FINISHED")
        return result
    except BaseException:
        parent.end("FAILED")
        raise
