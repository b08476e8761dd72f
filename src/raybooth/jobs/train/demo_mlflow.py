"""The demo's MLflow stage: what training recorded, the registered model promoted to `champion`,
and one image from it through MLflow's own `pyfunc` loader.

`report` is the demo's report (`raybooth.demo.report.Report`: say / save / figure / add /
next_steps); the training result comes in typed, the promoted URI goes out as the return value.
"""

from __future__ import annotations

from typing import Any

from raybooth.jobs.train.handoff import TrainingSummary
from raybooth.platform.mlflow.store import resolve_tracking_uri

CHAMPION = "champion"


def run_mlflow_stage(report: Any, summary: TrainingSummary | None, prompt: str) -> str | None:
    """Promote the training run's registered version to `champion` and draw `prompt` with it
    through `mlflow.pyfunc`; returns `models:/NAME@champion`, or None when nothing was registered."""
    import mlflow.pyfunc
    import pandas as pd

    from raybooth.platform.mlflow.pyfunc import decode_png
    from raybooth.platform.mlflow.registry import promote
    from raybooth.platform.mlflow.store import client_for, fluent_store

    uri = resolve_tracking_uri(None)
    report.next_steps.append("raybooth mlflow-ui   (then open http://127.0.0.1:5000: runs, metrics, images, models)")
    registration = summary.registration if summary is not None else None
    if registration is None or not registration.registered_model:
        report.say("MLflow: no registered model from training (tracking off or the store unreachable)")
        return None
    name, version = registration.registered_model, registration.registered_version
    run = client_for(uri).get_run(summary.mlflow_run_id)
    report.say(f"MLflow run {run.info.run_id} in {uri}: {len(run.data.params)} params, "
               f"final loss {run.data.metrics.get('loss', float('nan')):.4f}")
    promoted = promote(name, version, CHAMPION, uri)
    report.say(f"promoted {promoted.model_uri} -> version {version}")

    with fluent_store(uri):  # the embedded store, even with MLFLOW_TRACKING_URI unset
        model = mlflow.pyfunc.load_model(promoted.model_uri)
    out = model.predict(pd.DataFrame({"prompt": [prompt], "seed": [0]}))
    file = report.save(decode_png(out["image"][0]), "mlflow-pyfunc.png")
    report.add(
        "MLflow registry: the trained model through mlflow.pyfunc",
        [report.figure(file, prompt)],
        f"{promoted.model_uri} (version {version}, run {run.info.run_id[:8]}): "
        "predict(DataFrame(prompt, seed)) returns base64 PNGs",
    )
    report.next_steps += [
        "raybooth models list",
        f"raybooth generate --model {promoted.model_uri} --prompt '{prompt}' --out out/",
        f"MLFLOW_TRACKING_URI={uri} mlflow models serve -m {promoted.model_uri} --env-manager local -p 5001",
    ]
    return promoted.model_uri
