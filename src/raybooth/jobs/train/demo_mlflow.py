"""The demo's MLflow stage: what training recorded, the registered model promoted to `champion`,
and one image from it through MLflow's own `pyfunc` loader."""

from __future__ import annotations

from typing import Any

from raybooth.jobs.train.handoff import TrainingSummary
from raybooth.platform.mlflow.store import resolve_tracking_uri

CHAMPION = "champion"


def run_mlflow_stage(demo: Any) -> None:
    """Reads the training stage's TrainingSummary from `demo.state["train_summary"]`; records
    the promoted `models:/...@champion` URI as `demo.state["champion_uri"]`."""
    import mlflow.pyfunc
    import pandas as pd
    from PIL import Image

    from raybooth.platform.mlflow.pyfunc import decode_png
    from raybooth.platform.mlflow.registry import promote
    from raybooth.platform.mlflow.store import client_for, fluent_store

    summary: TrainingSummary | None = demo.state.get("train_summary")
    uri = resolve_tracking_uri(None)
    demo.next_steps.append("raybooth mlflow-ui   (then open http://127.0.0.1:5000: runs, metrics, images, models)")
    registration = summary.registration if summary is not None else None
    if registration is None or not registration.registered_model:
        demo.say("MLflow: no registered model from training (tracking off or the store unreachable)")
        return
    name, version = registration.registered_model, registration.registered_version
    run = client_for(uri).get_run(summary.mlflow_run_id)
    demo.say(
        f"MLflow run {run.info.run_id} in {uri}: {len(run.data.params)} params, "
        f"final loss {run.data.metrics.get('loss', float('nan')):.4f}"
    )
    promoted = promote(name, version, CHAMPION, uri)
    demo.say(f"promoted {promoted.model_uri} -> version {version}")
    demo.state["champion_uri"] = promoted.model_uri

    with fluent_store(uri):  # the embedded store, even with MLFLOW_TRACKING_URI unset
        model = mlflow.pyfunc.load_model(promoted.model_uri)
    prompt = run.data.tags.get("raybooth.subject.instance_prompt", "a photo of sks robot toy")
    out = model.predict(pd.DataFrame({"prompt": [prompt], "seed": [0]}))
    path = demo.out / "mlflow-pyfunc.png"
    decode_png(out["image"][0]).resize((128, 128), Image.NEAREST).save(path)
    demo.add(
        "MLflow registry: the trained model through mlflow.pyfunc",
        [path],
        f"{promoted.model_uri} (version {version}, run {run.info.run_id[:8]}); "
        f"predict(DataFrame(prompt, seed)) returns base64 PNGs",
    )
    demo.next_steps += [
        "raybooth models list",
        f"raybooth generate --model {promoted.model_uri} --prompt '{prompt}' --out out/",
        f"MLFLOW_TRACKING_URI={uri} mlflow models serve -m {promoted.model_uri} "
        "--env-manager local -p 5001",
    ]
