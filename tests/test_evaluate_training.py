"""The end-of-training evaluation: a training config with an `evaluation:` section judges the
exported model and puts the numbers on the same MLflow run and on the registered version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raybooth.platform.config import TrainConfig, with_overrides
from raybooth.platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _config(storage: Path, name: str, **values) -> TrainConfig:
    return with_overrides(TrainConfig(), {
        "subject.instance_data_dir": str(REPO / "examples" / "demo-subject"),
        "priors.enabled": False,
        "train.resolution": 64,
        "train.max_steps": 2,
        "train.checkpoint_every": 2,
        "train.validation_steps": 2,
        "train.log_every": 1,
        "scaling.num_workers": 1,
        "run.storage_path": str(storage),
        "run.name": name,
        "tracking.enabled": True,
        "tracking.experiment": "evaluate-e2e",
        "tracking.register_as": name,
        "evaluation": {
            "prompts": ["a sks robot toy on the beach", "a red sks robot toy"],
            "images_per_prompt": 2,
            "dino_encoder": "tiny-dino",
            "clip_encoder": "tiny-clip",
            "num_actors": 1,
            "steps": 2,
            "resolution": 64,
        },
        **values,
    })


def test_a_bad_evaluation_section_fails_before_training(tmp_path):
    config = _config(tmp_path, "bad-eval")
    config = with_overrides(config, {"evaluation.prompts": None, "evaluation.prompt_set": "cats"})
    from raybooth.jobs.train.driver import run_training

    with pytest.raises(ConfigError, match="evaluation.prompt_set 'cats'"):
        run_training(config, progress=False)
    assert not list((tmp_path / "bad-eval").glob("checkpoint*"))


class _ReportRecorder:
    """A Ray Train callback (it runs in the Train controller) that appends each report's metrics
    to a file the test reads."""

    def __new__(cls, path: Path):
        from ray.train.v2.api.callback import UserCallback

        class Recorder(UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                with open(path, "a") as fh:
                    fh.write(json.dumps(metrics[0]) + "\n")

        return Recorder()


def test_evaluation_every_is_checked_against_checkpoints(tmp_path):
    from raybooth.jobs.train.driver import run_training

    config = with_overrides(_config(tmp_path, "bad-every"), {"evaluation.every": 3})
    with pytest.raises(ConfigError, match=r"evaluation.every \(3\) must be a multiple of train.checkpoint_every"):
        run_training(config, progress=False)


@pytest.mark.timeout(900)
def test_live_and_end_of_training_evaluation_reach_ray_train_and_the_same_mlflow_run(ray_local, tmp_path):
    """One tracked run with `evaluation.every: 2` (checkpoints every step, 2 steps):
    - what a Tune scheduler sees: eval/* in the Ray Train reports of the steps that evaluate;
    - the end-of-training evaluation judges the exported model and lands on the training's own
      MLflow run (metrics, tags, report, grid and per-image table) and on the registered version.
    """
    import mlflow

    from raybooth.jobs.evaluate.report import EvaluationReport
    from raybooth.jobs.train.driver import run_training

    name = "eval-e2e"
    reports = tmp_path / "reports.jsonl"
    config = _config(tmp_path, name, **{"train.checkpoint_every": 1, "evaluation.every": 2})
    summary = run_training(config, progress=False, callbacks=[_ReportRecorder(reports)])

    seen = [json.loads(line) for line in reports.read_text().splitlines()]
    assert [r["step"] for r in seen] == [1, 2]
    assert "eval/dino" not in seen[0]  # step 1: no evaluation yet
    assert {"eval/dino", "eval/clip_i", "eval/clip_t"} <= set(seen[1])

    report_path = summary.run_dir / "evaluation" / "evaluation.json"
    report = EvaluationReport.read(report_path)
    assert report.counts["generated"] == 4
    assert report.model["model_kind"] == "local" and report.model["model_path"] == str(summary.model_path)
    # The live model at the last step is the exported model: the same images, the same numbers.
    assert seen[1]["eval/clip_t"] == pytest.approx(report.metrics["clip_t"].mean, abs=1e-3)

    client = mlflow.MlflowClient()
    run = client.get_run(summary.mlflow_run_id)  # the training run itself
    assert run.info.status == "FINISHED"
    for key in ("dino", "clip_i", "clip_t"):
        history = client.get_metric_history(run.info.run_id, f"eval/{key}")
        # One point a step: the live evaluation logged step 2 first, so the end-of-training
        # evaluation of the same model at the same step is not logged again (its exact numbers
        # are the tags below, the report and the registered version's tags).
        assert [m.step for m in history] == [summary.steps], key
        assert history[0].value == pytest.approx(seen[1][f"eval/{key}"], rel=1e-5)
        assert history[0].value == pytest.approx(report.metrics[key].mean, abs=1e-3)
        assert float(run.data.tags[f"raybooth.eval.{key}"]) == pytest.approx(report.metrics[key].mean, rel=1e-5)
    assert "eval/real_dino" in run.data.metrics and "eval/clip_t_low" in run.data.metrics
    files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/evaluation.json", "evaluation/grid.png", "evaluation/images.json"} <= files
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "evaluation/images.json")).read_text())
    assert "clip_t" in table["columns"] and len(table["data"]) == 4

    version = client.get_model_version(name, summary.registration.registered_version)
    assert version.run_id == run.info.run_id
    assert float(version.tags["eval.dino"]) == pytest.approx(report.metrics["dino"].mean, rel=1e-5)
    assert "eval.real_clip_i" in version.tags


@pytest.mark.timeout(300)
def test_live_evaluation_of_a_toy_model_reports_the_toy_judge():
    """What a CPU sweep of the toy world optimises (configs/tune/tiny.yaml): the live evaluator
    adds the toy judge's scores. The untrained toy base model follows the prompts' backgrounds and
    does not yet draw the subject, and the numbers say so."""
    import torch

    from raybooth.jobs.evaluate.live import live_evaluator
    from raybooth.jobs.train.model import load_train_models
    from raybooth.platform.images import list_images
    from raybooth.platform.models import resolve_model

    toy_subject = REPO / "examples" / "toy-subject"
    config = TrainConfig.model_validate({
        "model": "toy",
        "subject": {"instance_data_dir": str(toy_subject), "identifier": "sks",
                    "instance_prompt": "a sks circle", "class_prompt": "a circle"},
        "train": {"resolution": 32, "checkpoint_every": 1},
        "evaluation": {"prompt_set": "toy", "images_per_prompt": 1, "dino_encoder": "tiny-dino",
                       "clip_encoder": "tiny-clip", "steps": 25, "guidance_scale": 4.0, "every": 1},
    })
    device = torch.device("cpu")
    models = load_train_models(config, resolve_model("toy"), device)
    images = {str(p): p.read_bytes() for p in list_images(toy_subject, "instance")}
    evaluator = live_evaluator(config, images, device)
    assert evaluator is not None and evaluator.toy
    scores = evaluator.evaluate(models.unet, models.vae, models.text_encoder, models.tokenizer,
                                models.noise_scheduler.config, None)
    assert {"eval/dino", "eval/clip_i", "eval/clip_t", "eval/toy_subject", "eval/toy_prompt"} == set(scores)
    assert scores["eval/toy_prompt"] >= 0.8, scores  # the backgrounds asked for
    assert scores["eval/toy_subject"] <= 0.3, scores  # no split circle before DreamBooth

    # Not toy-based (the tiny model, the paper's prompts): no toy scores.
    plain = config.model_copy(update={"model": "tiny", "evaluation": config.evaluation.model_copy(
        update={"prompt_set": "object"})})
    assert not live_evaluator(plain, images, device).toy
