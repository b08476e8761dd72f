"""Autoscaling, as a user of the HTTP endpoint relies on it: sustained load makes Serve add a
replica of the model deployment, and when the load stops the extra replica goes away again.

Bounded: at most 8 concurrent one-image requests, for at most 90 s; the scale-down wait is
bounded too. The timings are printed (they go into benchmarks/README.md's autoscaling row).
"""

from __future__ import annotations

import threading
import time

import pytest

from _serve_support import free_port, generate, serve_config, start_app, stop_serve, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DEPLOYMENT = "TextToImage"
UPSCALE_DELAY_S = 1
DOWNSCALE_DELAY_S = 4


def running_replicas(deployment: str = DEPLOYMENT) -> int:
    from ray import serve

    app = serve.status().applications.get("raybooth")
    if app is None or deployment not in app.deployments:
        return 0
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.fixture
def autoscaling_app(ray_local):
    port = free_port()
    config = serve_config(
        {"text_to_image": [{"name": "tiny", "model": "tiny", "warmup_steps": 0}], "inpainting": []},
        [
            {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1}},
            {"name": DEPLOYMENT, "max_ongoing_requests": 4, "max_queued_requests": 64,
             "ray_actor_options": {"num_cpus": 1},
             "user_config": {"max_batch_size": 2, "batch_wait_timeout_s": 0.01},
             "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                    "upscale_delay_s": UPSCALE_DELAY_S, "downscale_delay_s": DOWNSCALE_DELAY_S,
                                    "metrics_interval_s": 0.5, "look_back_period_s": 2}},
        ],
        port,
    )
    url = start_app(config)
    yield url
    stop_serve()


def test_load_adds_a_replica_and_idle_removes_it(autoscaling_app):
    url = autoscaling_app
    assert running_replicas() == 1

    stop = threading.Event()
    answered: list[int] = []
    failures: list[str] = []

    def client(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            resp = generate(url, prompt=f"load {k}-{i}", seed=i, steps=8, n=1)
            (answered if resp.status_code == 200 else failures).append(resp.status_code)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        scaled_up = wait_until(lambda: running_replicas() == 2, timeout_s=90, poll_s=0.5)
        up_s = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert scaled_up, f"no second replica after 90 s of load ({len(answered)} requests answered)"
    assert not failures, f"requests failed during scale-up: {failures[:5]}"

    t1 = time.monotonic()
    scaled_down = wait_until(lambda: running_replicas() == 1, timeout_s=90, poll_s=0.5)
    down_s = time.monotonic() - t1
    assert scaled_down, "the second replica stayed after the load stopped"
    # The remaining replica still answers.
    assert generate(url, prompt="after", seed=1, steps=2, n=1).status_code == 200
    print(f"\nautoscaling: 1 -> 2 replicas {up_s:.1f} s after load began (upscale_delay_s "
          f"{UPSCALE_DELAY_S}); 2 -> 1 {down_s:.1f} s after it stopped (downscale_delay_s "
          f"{DOWNSCALE_DELAY_S}); {len(answered)} requests answered, 0 failed")
