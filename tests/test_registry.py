"""The MLflow registry: a trained model (full pipeline or LoRA adapter) logged as a pyfunc model,
registered with an alias, and used as `models:/NAME@ALIAS` / `models:/NAME/VERSION` by
`raybooth generate`, `mlflow.pyfunc.load_model(...).predict(...)` and `raybooth models` — on the
embedded SQLite store and through a real `mlflow server` with proxied artifacts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from _mlflow_server import free_port, shared_server
from PIL import Image

from raybooth.cli import main as cli
from raybooth.jobs.train.handoff import Export, TrainingSummary
from raybooth.jobs.train.register import register_training
from raybooth.jobs.train.tracking import start_training_run
from raybooth.platform.config import TrainConfig, with_overrides
from raybooth.platform.errors import ModelError
from raybooth.platform.generation import GenerationParams
from raybooth.platform.mlflow.pyfunc import decode_png
from raybooth.platform.mlflow.runs import RunTracker
from raybooth.platform.models import resolve_model
from raybooth.platform.pipelines import DiffusionRunner

STEPS = 2


def _config(name: str, uri: str | None = None, mode: str = "full") -> TrainConfig:
    values = {"run.name": f"registry-{name}", "tracking.register_as": name, "train.mode": mode,
              "train.validation_steps": STEPS}
    if uri:
        values["tracking.tracking_uri"] = uri
    return with_overrides(TrainConfig(), values)


@pytest.fixture(scope="module")
def full_export(tmp_path_factory, tiny_path) -> Path:
    """What full-mode training exports: a diffusers pipeline directory (here: the tiny model)."""
    out = tmp_path_factory.mktemp("export") / "model"
    shutil.copytree(tiny_path, out)
    return out


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory, tiny_path) -> Path:
    """What LoRA training exports: an adapter for the tiny model, with weights that visibly change
    its output (a fresh adapter's B matrices are zero, i.e. it would change nothing)."""
    from raybooth.platform.lora import add_lora, save_lora_adapter
    from raybooth.platform.models import load_components

    comps = load_components(resolve_model("tiny"))
    add_lora(comps["unet"], comps["text_encoder"], rank=4)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in comps["unet"].named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("export") / "lora"
    save_lora_adapter(out, comps["unet"], comps["text_encoder"],
                      metadata={"base_model": "tiny", "base_revision": None})
    return out


def _train_run(config: TrainConfig, tmp: Path) -> tuple[str, RunTracker]:
    """A tracked run as the training driver leaves it: params, a loss history, ended."""
    tracker = start_training_run(config, tmp / config.run.name)
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    assert tracker.flush(30)
    return tracker.run_id, tracker


def _register(config, tmp, export: Path) -> dict:
    run_id, tracker = _train_run(config, tmp)
    summary = TrainingSummary(
        run_dir=tmp / config.run.name,
        export=Export(mode=config.train.mode, path=export, step=3, base_model="tiny"),
        final_loss=0.333, final_metrics={}, checkpoint=tmp / "checkpoint-000003", resumed_from=None,
        num_workers=1, class_image_set="set-1", class_images_dir=None, validation_images=[],
        mlflow_run_id=run_id, registration=None, train_seconds=1.0,
    )
    registration = register_training(config, summary)
    tracker.end()
    return {**registration.to_json(), "run_id": run_id}


def _tiny_image(prompt: str, seed: int) -> np.ndarray:
    runner = DiffusionRunner("tiny")
    return np.asarray(runner.text_to_image([prompt], [seed], GenerationParams(steps=STEPS))[0])


def _generate(model: str, out: Path, seed: int = 3) -> tuple[np.ndarray, dict]:
    rc = cli(["generate", "--model", model, "--prompt", "a photo of sks toy", "--seed", str(seed),
              "--steps", str(STEPS), "--out", str(out)])
    assert rc == 0
    png = sorted(out.glob("*.png"))[-1]
    return np.asarray(Image.open(png).convert("RGB")), json.loads(png.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def full_model(tmp_path_factory, full_export) -> dict:
    return _register(_config("reg-full"), tmp_path_factory.mktemp("runs"), full_export)


# ---------------------------------------------------------------------------------------------
# Embedded store


@pytest.mark.timeout(180)
def test_full_model_is_registered_with_alias_tags_and_signature(full_model, raybooth_home):
    assert full_model["registered_model"] == "reg-full"
    assert full_model["alias"] == "candidate"
    assert full_model["model_uri"] == "models:/reg-full@candidate"
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("reg-full", "candidate")
    assert str(version.version) == full_model["registered_version"]
    assert version.run_id == full_model["run_id"]
    tags = version.tags
    assert tags["subject"] == "sks" and tags["instance_prompt"] == TrainConfig().subject.instance_prompt
    assert tags["run_id"] == full_model["run_id"]
    assert tags["metric.loss"] == "0.333333" and tags["final_loss"] == "0.333"
    run = client.get_run(full_model["run_id"])
    assert run.info.status == "FINISHED"
    # The model's files belong to the training run's experiment, in the embedded artifact root.
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == run.info.run_id and logged.experiment_id == run.info.experiment_id
    assert logged.artifact_location.startswith((raybooth_home / "mlartifacts").as_uri())
    # The logged pyfunc model carries a signature and an input example.
    info = mlflow.models.get_model_info("models:/reg-full@candidate")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == [
        "prompt", "seed", "negative_prompt", "steps", "guidance_scale"]
    assert info.saved_input_example_info is not None
    assert "python_function" in info.flavors


@pytest.mark.timeout(180)
def test_generate_with_a_registered_full_model(full_model, tmp_path):
    # The registered pipeline is the tiny model's weights: the same seed gives the same pixels.
    image, sidecar = _generate("models:/reg-full@candidate", tmp_path / "a")
    assert np.array_equal(image, _tiny_image("a photo of sks toy", 3))
    assert sidecar["model"] == "models:/reg-full@candidate"
    assert sidecar["model_kind"] == "mlflow"
    assert sidecar["registered_version"] == full_model["registered_version"]
    # By version number too, from the same local cache.
    by_version = resolve_model(f"models:/reg-full/{full_model['registered_version']}")
    assert by_version.path == resolve_model("models:/reg-full@candidate").path
    assert (by_version.path / "model_index.json").is_file()


@pytest.mark.timeout(180)
def test_embedded_store_is_found_without_mlflow_tracking_uri(full_model, raybooth_home, tmp_path):
    """A user with no MLFLOW_TRACKING_URI, in some other folder: `models:/` still resolves in
    the embedded store (and MLflow's own default, ./mlflow.db, is neither read nor created)."""
    shutil.rmtree(raybooth_home / "models" / "mlflow", ignore_errors=True)  # force a download
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("raybooth")), "generate", "--model", "models:/reg-full@candidate",
         "--prompt", "a photo of sks toy", "--seed", "3", "--steps", str(STEPS), "--out", str(tmp_path / "o")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()
    image = np.asarray(Image.open(next((tmp_path / "o").glob("*.png"))).convert("RGB"))
    assert np.array_equal(image, _tiny_image("a photo of sks toy", 3))


@pytest.mark.timeout(180)
def test_pyfunc_predict_returns_png_images(full_model):
    model = mlflow.pyfunc.load_model("models:/reg-full@candidate")
    out = model.predict(pd.DataFrame({"prompt": ["a photo of sks toy", "a photo of sks toy"],
                                      "seed": [3, 4]}))
    assert list(out.columns) == ["image", "seed"] and list(out["seed"]) == [3, 4]
    images = [decode_png(b64) for b64 in out["image"]]
    assert all(img.size == (64, 64) for img in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    # Default steps are the training config's validation steps: the same image as generate
    # (alone exactly; in a batch of two, batched float math may move a pixel by one level).
    alone = model.predict(pd.DataFrame({"prompt": ["a photo of sks toy"], "seed": [3]}))
    expected = _tiny_image("a photo of sks toy", 3)
    assert np.array_equal(np.asarray(decode_png(alone["image"][0])), expected)
    assert np.abs(np.asarray(images[0]).astype(int) - expected).max() <= 2
    # Optional columns: a per-row step count and a negative prompt.
    more = model.predict(pd.DataFrame({"prompt": ["x", "y"], "seed": [1, 1], "steps": [1, 3],
                                       "negative_prompt": ["blurry", "blurry"]}))
    assert len(more) == 2 and more["image"][0] != more["image"][1]


@pytest.mark.timeout(180)
def test_mlflow_models_serve_answers_with_images(full_model, tmp_path):
    """`mlflow models serve` (MLflow's own scoring server) runs the registered model."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/reg-full@candidate",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # It execs `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv.
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        ready = False
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = requests.get(url + "/ping", timeout=1).status_code == 200
            except requests.RequestException:
                time.sleep(0.5)
        assert ready, log_path.read_text()[-3000:]
        r = requests.post(url + "/invocations", timeout=60,
                          json={"dataframe_records": [{"prompt": "a photo of sks toy", "seed": 3}]})
        assert r.status_code == 200, r.text[:500]
        [prediction] = r.json()["predictions"]
        assert prediction["seed"] == 3
        assert np.array_equal(np.asarray(decode_png(prediction["image"])), _tiny_image("a photo of sks toy", 3))
        # The signature is enforced: a row without a seed is a 4xx, not a crash.
        bad = requests.post(url + "/invocations", timeout=60, json={"dataframe_records": [{"prompt": "x"}]})
        assert 400 <= bad.status_code < 500 and "seed" in bad.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.timeout(240)
def test_lora_model_resolves_to_base_plus_adapter(tmp_path_factory, lora_export, tiny_path, tmp_path):
    result = _register(_config("reg-lora", mode="lora"), tmp_path_factory.mktemp("runs"), lora_export)
    assert result["model_uri"] == "models:/reg-lora@candidate"
    resolved = resolve_model("models:/reg-lora@candidate")
    assert resolved.path == tiny_path  # the base model, by reference
    assert (resolved.lora_path / "pytorch_lora_weights.safetensors").is_file()
    assert resolved.extra["base_model"] == "tiny"
    image, sidecar = _generate("models:/reg-lora@candidate", tmp_path / "g")
    assert sidecar["lora"] == str(resolved.lora_path)
    # The adapter is applied: not the base model's image.
    assert not np.array_equal(image, _tiny_image("a photo of sks toy", 3))
    out = mlflow.pyfunc.load_model("models:/reg-lora@candidate").predict(
        pd.DataFrame({"prompt": ["a photo of sks toy"], "seed": [3]}))
    assert np.array_equal(np.asarray(decode_png(out["image"][0])), image)


@pytest.mark.timeout(240)
def test_models_list_and_promote(full_model, full_export, tmp_path, capsys):
    # A second training of the same subject: the candidate alias moves to it.
    second = _register(_config("reg-full"), tmp_path, full_export)
    v1, v2 = full_model["registered_version"], second["registered_version"]
    assert int(v2) == int(v1) + 1
    assert cli(["models", "promote", "reg-full", v1, "--alias", "champion"]) == 0
    assert f"models:/reg-full@champion -> version {v1}" in capsys.readouterr().out
    assert resolve_model("models:/reg-full@champion").revision == v1
    assert resolve_model("models:/reg-full@candidate").revision == v2

    assert cli(["models", "list"]) == 0
    table = capsys.readouterr().out
    row_v1 = next(line for line in table.splitlines() if line.startswith("reg-full") and f" {v1} " in line)
    assert "@champion" in row_v1 and "loss=0.333333" in row_v1 and full_model["run_id"] in row_v1
    assert cli(["models", "list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["reg-full"]["aliases"] == {"champion": v1, "candidate": v2}

    # Promoting moves an alias; the old target is reported.
    assert cli(["models", "promote", "reg-full", v2, "--alias", "champion"]) == 0
    assert f"(was version {v1})" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_bad_registry_references_say_what_exists(full_model, tmp_path, capsys):
    with pytest.raises(ModelError, match="no registered model 'nope'"):
        resolve_model("models:/nope@candidate")
    with pytest.raises(ModelError, match=r"has no alias 'prod' \(aliases: .*@candidate"):
        resolve_model("models:/reg-full@prod")
    with pytest.raises(ModelError, match=r"has no version 99 \(versions: 1"):
        resolve_model("models:/reg-full/99")
    with pytest.raises(ModelError, match="models:/NAME@ALIAS"):
        resolve_model("models:/reg-full")
    assert cli(["generate", "--model", "models:/reg-full@prod", "--prompt", "x",
                "--out", str(tmp_path)]) == 2
    assert "raybooth models promote reg-full VERSION --alias prod" in capsys.readouterr().err
    assert cli(["models", "promote", "reg-full", "1", "--alias", "latest"]) == 2
    assert "reserves" in capsys.readouterr().err
    assert cli(["models", "promote", "reg-full", "42"]) == 2
    assert "no version 42" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A real tracking server with proxied artifacts


@pytest.mark.timeout(300)
def test_register_and_use_through_a_real_server(full_export, tmp_path, monkeypatch):
    server = shared_server()
    result = _register(_config("served-full", server.url), tmp_path, full_export)
    assert result["model_uri"] == "models:/served-full@candidate"
    # Uploaded through the server into its artifact destination.
    assert list((server.root / "artifacts").rglob("model_index.json"))
    # Clients (generate, Serve, pyfunc) find the registry through MLFLOW_TRACKING_URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    resolved = resolve_model("models:/served-full@candidate")
    assert "mlflow" in resolved.path.parts and (resolved.path / "model_index.json").is_file()
    image, _ = _generate("models:/served-full@candidate", tmp_path / "g")
    assert np.array_equal(image, _tiny_image("a photo of sks toy", 3))
    out = mlflow.pyfunc.load_model("models:/served-full@candidate").predict(
        pd.DataFrame({"prompt": ["a photo of sks toy"], "seed": [3]}))
    assert np.array_equal(np.asarray(decode_png(out["image"][0])), image)
    # A server that does not answer: a clear error for a reference, not a hang or a traceback.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ModelError, match="does not answer"):
        resolve_model("models:/served-full@candidate")
