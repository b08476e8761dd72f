"""DreamBooth on Ray Train.

`driver` (run_training: checks, priors, TorchTrainer, export, registration), `loop` (what every
worker runs), `data`, `model`, `loss`, `validation`, `metrics`, `checkpoints`, `export`,
`inputs` (driver-side checks before any worker starts), `handoff` (the typed objects that cross
between them: WorkerJob, Export, TrainingSummary), `tracking` (what a training run records in
MLflow), `register` (a trained run into the model registry), `demo_mlflow` (the demo's MLflow stage).
"""
