"""The evaluation at the end of a training run (a training config with an `evaluation:` section).

The driver calls `check_training_evaluation` with its other input checks (before Ray or any worker
starts) and `evaluate_training` once the model is exported and registered. The exported model is
judged like `raybooth evaluate` would (`<run_dir>/evaluation/`: evaluation.json, images, grid), and
the numbers go where a reader of the run looks:

- the run's metrics `eval/dino`, `eval/clip_i`, `eval/clip_t` at the final step (plus
  `eval/<metric>_low|_high`, the 95% interval, and `eval/real_<metric>`, the real-vs-real baseline);
- the run's artifacts `evaluation/` (evaluation.json, grid.png) and a per-image table
  `evaluation/images.json` (`mlflow.log_table`: prompt, seed, the three scores, file);
- tags on the run (`raybooth.eval.*`) and on the registered model version (`eval.dino`, ...).

MLflow being away never fails a finished training: the report stays in the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from raybooth.jobs.evaluate.job import EvaluationResult, check_inputs, run_evaluation
from raybooth.jobs.evaluate.report import REPORT_FILE, EvaluationReport
from raybooth.jobs.evaluate.toy_scores import training_is_toy_based
from raybooth.platform.config import TrainConfig
from raybooth.platform.errors import ConfigError

log = logging.getLogger("raybooth.evaluate")

EVAL_DIR = "evaluation"
METRIC_PREFIX = "eval/"
TABLE_FILE = "evaluation/images.json"


def mlflow_metrics(report: EvaluationReport) -> dict[str, float]:
    """`eval/dino`, `eval/dino_low`, `eval/dino_high`, ..., `eval/real_dino`, ..."""
    out: dict[str, float] = {}
    for name, est in report.metrics.items():
        out[f"{METRIC_PREFIX}{name}"] = est.mean
        out[f"{METRIC_PREFIX}{name}_low"] = est.low
        out[f"{METRIC_PREFIX}{name}_high"] = est.high
    for name, est in report.baseline.items():
        out[f"{METRIC_PREFIX}real_{name}"] = est.mean
    return out


def image_table(report: EvaluationReport) -> dict[str, list[Any]]:
    """The per-image table, column-wise (what `log_table` takes)."""
    columns = ("prompt", "class_prompt", "category", "seed", "dino", "clip_i", "clip_t", "file")
    table = {c: [getattr(r, c) for r in report.images] for c in columns}
    for name in report.metrics:  # the toy judge's scores, when the model is toy-based
        if name not in columns:
            table[name] = [r.extra.get(name) for r in report.images]
    return table


def check_training_evaluation(config: TrainConfig) -> None:
    """The evaluation's own checks (prompts, encoders, sizes, subject photos), on the driver before
    training starts, so a bad `evaluation:` section never costs a training run. The model is the
    one about to be trained: checked by training itself."""
    ev = config.evaluation
    if ev is not None and ev.every and ev.every % config.train.checkpoint_every:
        raise ConfigError(
            f"evaluation.every ({ev.every}) must be a multiple of train.checkpoint_every "
            f"({config.train.checkpoint_every}): the numbers reach Ray Train (and Tune) with a "
            "checkpoint's report",
            field="evaluation.every",
        )
    if ev is not None:
        check_inputs(model=config.model, model_options=config.model_options, lora=None,
                     subject=config.subject, evaluation=config.evaluation, output_dir=None,
                     check_model=False)


def evaluate_training(config: TrainConfig, summary: Any, tracker: Any = None, *, progress: bool = True) -> EvaluationResult | None:
    """Judge the run's exported model (a `TrainingSummary`); log to the run's MLflow `tracker`
    (a RunTracker, or None) and tag the registered version. None when the config has no
    `evaluation:` section."""
    if config.evaluation is None:
        return None
    lora = summary.lora_path
    model = config.model if lora is not None else str(summary.model_path)
    result = run_evaluation(
        model=model, model_options=config.model_options, lora=str(lora) if lora else None,
        subject=config.subject, evaluation=config.evaluation,
        output_dir=Path(summary.run_dir) / EVAL_DIR, progress=progress,
        toy_based=training_is_toy_based(config.model, config.evaluation.prompt_set,
                                        config.evaluation.prompts is not None),  # the export is the run's child
    )
    report = result.report
    print("evaluation: " + ", ".join(f"{k} {v.mean:.4f}" for k, v in report.metrics.items())
          + f" ({result.path})", flush=True)
    if tracker is not None and getattr(tracker, "run_id", None):
        log_to_run(tracker, result, step=summary.steps)
    registration = summary.registration
    if registration is not None and registration.registered_model and registration.registered_version:
        tag_version(tracker.tracking_uri if tracker is not None else config.tracking.tracking_uri,
                    registration.registered_model, registration.registered_version, report)
    return result


def log_to_run(tracker: Any, result: EvaluationResult, *, step: int) -> None:
    report, folder = result.report, result.path.parent
    tracker.log_metrics(mlflow_metrics(report), step=step)
    tracker.set_tags({f"raybooth.eval.{k}": f"{v.mean:.6g}" for k, v in report.metrics.items()}
                     | {"raybooth.evaluation": str(result.path)})
    tracker.log_artifact(folder / REPORT_FILE, EVAL_DIR)
    tracker.log_artifact(folder / report.files["grid"], EVAL_DIR)
    try:
        import mlflow

        mlflow.MlflowClient(tracking_uri=tracker.tracking_uri).log_table(
            tracker.run_id, data=image_table(report), artifact_file=TABLE_FILE)
    except Exception as exc:  # the store may be away; the report is on disk
        log.warning("could not log the evaluation table to MLflow: %s", exc)


def tag_version(tracking_uri: str | None, name: str, version: str, report: EvaluationReport) -> None:
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        for key, est in report.metrics.items():
            client.set_model_version_tag(name, version, f"eval.{key}", f"{est.mean:.6g}")
        for key, est in report.baseline.items():
            client.set_model_version_tag(name, version, f"eval.real_{key}", f"{est.mean:.6g}")
    except Exception as exc:
        log.warning("could not tag model version %s/%s with the evaluation: %s", name, version, exc)
