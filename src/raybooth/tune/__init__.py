"""Ray Tune sweeps over the training job (`raybooth tune`).

Depends on `raybooth.jobs` and `raybooth.platform`; `tests/test_architecture.py` checks it.
"""
