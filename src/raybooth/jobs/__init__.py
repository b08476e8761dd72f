"""Ray jobs, one package each: `priors` (class images from a pool of actors), `train` (DreamBooth
on Ray Train), `evaluate` (the DreamBooth paper's metrics), `submit` (running any of them on a Ray
cluster), `toy` (training the toy world's base models).

Depends only on `raybooth.platform`; `tests/test_architecture.py` checks it.
"""
