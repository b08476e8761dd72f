"""Shared test set-up: an isolated $RAYBOOTH_HOME, offline Hub, and one local Ray per session.

RAYBOOTH_HOME is set at import time, before Ray starts, so Ray workers inherit it and find the
tiny models that the driver built.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="raybooth-test-home-"))
os.environ["RAYBOOTH_HOME"] = str(_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Serve kills an HTTP proxy that is not ready after 3 checks of 5 s; on two loaded cores its
# process can take longer than that to start (seen at load average 15-40).
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
# Ray Train's controller polls its workers every 2 s: that is when it sees a run end or a worker
# die. The suite runs ~30 short trainings, each waiting on a poll at its end (and the recovery
# tests on another after a kill); 0.5 s polls cut ~3 s a run (measured) and change nothing else.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_HOME}/mlflow.db")

REPO = Path(__file__).resolve().parents[1]
# Logical CPUs for the shared Ray instance: two training workers, the Train controller and a
# couple of actors must fit on this 2-core machine at once.
RAY_CPUS = 4


@pytest.fixture(scope="session")
def raybooth_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from raybooth.platform.tiny import tiny_model_path

    return tiny_model_path("tiny")


@pytest.fixture(scope="session")
def tiny_inpainting_path() -> Path:
    from raybooth.platform.tiny import tiny_model_path

    return tiny_model_path("tiny-inpainting")


@pytest.fixture
def ray_local(tiny_path, tiny_inpainting_path):
    """A local Ray instance shared by the tests that use it (started once, on first use).

    A test that needs its own cluster (ray.cluster_utils.Cluster, `ray start`) calls
    `ray.shutdown()` first; the next user of this fixture starts a fresh local instance.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield ray


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass


# Modules that end the shared local Ray (they run clusters of their own: `ray start`,
# ray.cluster_utils, sweeps that start Ray with its dashboard). Run last, in this order, so the
# shared instance is started once instead of again after each of them (~5 s a start).
OWN_CLUSTER_MODULES = ("test_serve_cli.py", "test_submit.py", "test_train_multinode.py", "test_tune.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return OWN_CLUSTER_MODULES.index(name) if name in OWN_CLUSTER_MODULES else -1

    items.sort(key=rank)  # stable: the order inside each group is pytest's
