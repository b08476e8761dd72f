"""MLflow tracking: the embedded SQLite default, one run per job (continued on resume), the rank-0
worker attaching by id, and logging that never stops training — against the embedded store and
a real `mlflow server` that is stopped and restarted while metrics are being logged."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from _mlflow_server import free_port, shared_server
from PIL import Image

from raybooth.jobs.train.tracking import start_training_run
from raybooth.platform.config import TrainConfig, flatten, with_overrides
from raybooth.platform.mlflow.runs import RUN_RECORD, RunTracker


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _config(**values) -> TrainConfig:
    return with_overrides(TrainConfig(), {"run.name": "tracking-test", **values})


def _steps(client, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture
def server():
    return shared_server()


# ---------------------------------------------------------------------------------------------
# Embedded store


@pytest.mark.timeout(120)
def test_embedded_default_records_params_tags_metrics_and_images(tmp_path, raybooth_home, monkeypatch):
    # Nothing configured at all: the run goes to SQLite in $RAYBOOTH_HOME, artifacts beside it.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _config()
    tracker = start_training_run(config, tmp_path / "run")
    assert tracker.run_id is not None
    assert tracker.tracking_uri == f"sqlite:///{raybooth_home / 'mlflow.db'}"
    record = json.loads((tmp_path / "run" / RUN_RECORD).read_text())
    assert record["run_id"] == tracker.run_id

    worker = RunTracker.attach(tracker.tracking_uri, tracker.run_id)
    for step in range(1, 6):
        worker.log_metrics({"loss": 1.0 / step, "instance_loss": 0.5, "prior_loss": 0.25, "lr": 1e-5,
                            "steps_per_second": 2.0, "samples_per_second": 4.0, "peak_memory_mb": 100.0},
                           step=step)
    worker.log_image(Image.new("RGB", (16, 16), (255, 0, 0)), "validation/step-000005.png")
    assert worker.flush(30)
    tracker.set_tags({"raybooth.class_image_set": "abc123"})
    tracker.end()

    client = _client(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    # Every resolved config value is a param.
    expected = flatten(config)
    assert set(expected) <= set(run.data.params)
    assert run.data.params["train.learning_rate"] == str(config.train.learning_rate)
    assert json.loads(run.data.params["train.validation_prompts"]) == config.train.validation_prompts
    tags = run.data.tags
    assert tags["raybooth.subject.instance_prompt"] == config.subject.instance_prompt
    assert tags["raybooth.num_workers"] == str(config.scaling.num_workers)
    assert tags["raybooth.device_type"] == "cpu"
    for module in ("ray", "torch", "diffusers"):
        assert tags[f"version.{module}"]
    assert tags["raybooth.class_image_set"] == "abc123"
    assert _steps(client, tracker.run_id) == [1, 2, 3, 4, 5]
    assert _steps(client, tracker.run_id, "peak_memory_mb") == [1, 2, 3, 4, 5]
    # The image is a real PNG under $RAYBOOTH_HOME/mlartifacts.
    assert [a.path for a in client.list_artifacts(tracker.run_id, "validation")] == [
        "validation/step-000005.png"
    ]
    assert run.info.artifact_uri.startswith((raybooth_home / "mlartifacts").as_uri())
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "validation" / "step-000005.png"
    assert Image.open(stored).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.timeout(120)
def test_restarted_driver_continues_the_same_run(tmp_path):
    config = _config(**{"tracking.experiment": "reuse-test"})
    run_dir = tmp_path / "run"
    first = start_training_run(config, run_dir)
    first.log_metrics({"loss": 1.0}, step=1)
    first.flush()
    # The driver died without ending the run; the restarted job (resume) must continue it.
    resumed_config = with_overrides(config, {"run.resume_from": "latest"})
    second = start_training_run(resumed_config, run_dir)
    assert second.run_id == first.run_id and second.reused
    second.log_metrics({"loss": 0.5}, step=2)
    second.end()
    client = _client(second.tracking_uri)
    runs = client.search_runs([second.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]
    run = client.get_run(first.run_id)
    assert _steps(client, first.run_id) == [1, 2]
    # A changed param cannot be re-logged (MLflow params are immutable): it is noted as a tag.
    assert run.data.params["run.resume_from"] == "None"
    assert run.data.tags["raybooth.param_changed.run.resume_from"] == "latest"
    assert run.info.status == "FINISHED"

    # A finished job started again from scratch (no resume) is a new run.
    third = start_training_run(config, run_dir)
    assert third.run_id != first.run_id
    third.end()
    assert json.loads((run_dir / RUN_RECORD).read_text())["run_id"] == third.run_id


def test_disabled_tracking_is_a_no_op(tmp_path):
    tracker = start_training_run(_config(**{"tracking.enabled": False}), tmp_path / "run")
    assert tracker.run_id is None and not tracker.enabled
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_image(Image.new("RGB", (4, 4)), "validation/x.png")
    tracker.set_tags({"a": "b"})
    assert tracker.flush(1)
    tracker.end()
    assert not (tmp_path / "run" / RUN_RECORD).exists()
    assert RunTracker.attach("sqlite:///x.db", None).run_id is None


@pytest.mark.timeout(60)
def test_unreachable_server_warns_and_training_goes_on(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="raybooth.mlflow"):
        tracker = start_training_run(_config(**{"tracking.tracking_uri": uri}), tmp_path / "run")
    assert time.monotonic() - t0 < 15
    assert tracker.run_id is None
    assert any("not reachable" in r.getMessage() and uri in r.getMessage() for r in caplog.records)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end()


@pytest.mark.timeout(60)
def test_bad_values_are_warned_not_raised(tmp_path, caplog):
    tracker = start_training_run(_config(), tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="raybooth.mlflow"):
        tracker.log_metrics({"loss": "not a number"}, step=1)
        tracker.log_image("not an image", "validation/x.png")
        tracker.log_image(Image.new("RGB", (4, 4)), "../escape.png")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "loss" in messages and "validation/x.png" in messages and "escape" in messages
    assert tracker.flush(30)
    with caplog.at_level(logging.WARNING, logger="raybooth.mlflow"):
        # MLflow params are immutable: the store refuses a new value for good. That must be
        # dropped with a warning, not retried forever in front of everything logged after it.
        tracker.log_params({"train.max_steps": "999", "custom.note": "kept"})
        tracker.log_metrics({"loss": 2.0}, step=1)
        assert tracker.flush(30)
    assert any("refused params" in r.getMessage() and "train.max_steps" in r.getMessage()
               for r in caplog.records)
    tracker.end()
    client = _client(tracker.tracking_uri)
    assert _steps(client, tracker.run_id) == [1]
    params = client.get_run(tracker.run_id).data.params
    assert params["train.max_steps"] == "20" and params["custom.note"] == "kept"


# ---------------------------------------------------------------------------------------------
# A real tracking server


@pytest.mark.timeout(120)
def test_tracking_through_a_real_server_with_proxied_artifacts(tmp_path, server):
    config = _config(**{"tracking.tracking_uri": server.url})
    tracker = start_training_run(config, tmp_path / "run")
    assert tracker.run_id and tracker.tracking_uri == server.url
    worker = RunTracker.attach(server.url, tracker.run_id)
    for step in range(3):
        worker.log_metrics({"loss": float(step)}, step=step)
    worker.log_image(Image.new("RGB", (8, 8), (0, 255, 0)), "validation/step-000002.png")
    assert worker.flush(30)
    tracker.end()
    client = _client(server.url)
    assert _steps(client, tracker.run_id) == [0, 1, 2]
    assert client.get_run(tracker.run_id).data.params["run.name"] == "tracking-test"
    # Proxied artifacts: the client uploaded over HTTP, the server wrote to its destination.
    stored = list((server.root / "artifacts").rglob("step-000002.png"))
    assert len(stored) == 1 and Image.open(stored[0]).getpixel((0, 0)) == (0, 255, 0)


@pytest.mark.timeout(180)
def test_server_stopped_and_restarted_while_logging(tmp_path, server, caplog):
    tracker = start_training_run(_config(**{"tracking.tracking_uri": server.url}), tmp_path / "run")
    worker = RunTracker.attach(server.url, tracker.run_id)
    slowest = 0.0
    step = 0

    def log_steps(n: int) -> None:
        nonlocal step, slowest
        for _ in range(n):
            t0 = time.perf_counter()
            worker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
            if step % 10 == 0:
                worker.log_image(Image.new("RGB", (8, 8)), f"validation/step-{step:06d}.png")
            slowest = max(slowest, time.perf_counter() - t0)
            step += 1
            time.sleep(0.02)

    with caplog.at_level(logging.WARNING, logger="raybooth.mlflow"):
        log_steps(20)
        server.stop()
        log_steps(40)  # the training loop goes on while the server is down
        assert not worker.flush(timeout_s=2)  # undelivered, and the tracker says so
        server.start()
        log_steps(20)
        assert worker.flush(timeout_s=60)
    tracker.end()
    assert slowest < 0.5, f"a log call blocked for {slowest:.2f} s"
    client = _client(server.url)
    # Every point arrived exactly once, with its own step.
    assert _steps(client, tracker.run_id) == list(range(80))
    assert len(client.list_artifacts(tracker.run_id, "validation")) == 8
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    messages = [r.getMessage() for r in caplog.records]
    assert any("not yet delivered" in m and "still retrying" in m for m in messages)
    # An outage that hits between requests is reported, and so is the recovery. (One that hits
    # during a request may be ridden out by MLflow's own HTTP retries instead.)
    if any("buffered and retried" in m for m in messages):
        assert any("is back" in m for m in messages)


# ---------------------------------------------------------------------------------------------
# raybooth mlflow-ui


@pytest.mark.timeout(120)
def test_mlflow_ui_command_serves_the_embedded_store(tmp_path, raybooth_home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # nothing configured: the embedded default
    start_training_run(_config(**{"tracking.experiment": "ui-test"}), tmp_path / "run").end()
    port = free_port()
    log_path = tmp_path / "ui.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raybooth.cli", "mlflow-ui", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        ok = False
        while time.monotonic() < deadline and proc.poll() is None and not ok:
            try:
                ok = requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except requests.RequestException:
                time.sleep(0.5)
        assert ok, log_path.read_text()[-3000:]
        # The UI reads the embedded store: the experiment logged above is there.
        r = requests.post(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                          json={"max_results": 100}, timeout=10)
        assert "ui-test" in {e["name"] for e in r.json()["experiments"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.timeout(120)
def test_restarted_worker_and_backfill_keep_one_point_per_step(tmp_path):
    tracker = start_training_run(_config(**{"tracking.experiment": "dedup-test"}), tmp_path / "run")
    first = RunTracker.attach(tracker.tracking_uri, tracker.run_id)
    for step in range(1, 6):
        first.log_metrics({"loss": float(step)}, step=step)
    first.log_image(Image.new("RGB", (4, 4), (1, 2, 3)), "validation/step-000004.png")
    assert first.flush(30)
    # The worker group restarts from the checkpoint at step 3 and trains steps 4.. again.
    second = RunTracker.attach(tracker.tracking_uri, tracker.run_id)
    for step in range(4, 9):
        second.log_metrics({"loss": float(step)}, step=step)
    assert second.flush(30)
    # Steps 9 and 10 were recorded in the run directory but never reached the store.
    local = {s: {"step": s, "loss": float(s), "time": time.time()} for s in range(1, 11)}
    images = {}
    for step in (4, 10):
        path = tmp_path / f"step-{step:06d}.png"
        Image.new("RGB", (4, 4), (9, 9, 9)).save(path)
        images[f"validation/step-{step:06d}.png"] = path
    tracker.backfill(local, images)
    tracker.end()
    client = _client(tracker.tracking_uri)
    assert _steps(client, tracker.run_id) == list(range(1, 11))
    files = sorted(a.path for a in client.list_artifacts(tracker.run_id, "validation"))
    assert files == ["validation/step-000004.png", "validation/step-000010.png"]
    # The image the run already had is kept, not replaced by the back-filled copy.
    stored = Path(client.get_run(tracker.run_id).info.artifact_uri.removeprefix("file://"))
    assert Image.open(stored / "validation" / "step-000004.png").getpixel((0, 0)) == (1, 2, 3)
