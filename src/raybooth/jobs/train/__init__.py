"""DreamBooth on Ray Train.

`driver` (run_training: checks, priors, TorchTrainer, export, registration), `loop` (what every
worker runs), `data`, `model`, `loss`, `validation`, `metrics`, `checkpoints`, `export`,
`inputs` (driver-side checks before any worker starts).
"""
