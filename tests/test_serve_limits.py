"""The Serve app under pressure and behind API keys (real HTTP, tiny models): a full queue is a
503 with Retry-After, a slow generation is a 504 at the request timeout, and API keys from an
environment variable or a file (re-read when it changes) guard every route but /healthz."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from types import SimpleNamespace

import pytest
import requests

from _serve_support import free_port, generate, serve_config, start_app, stop_serve

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

ENV_KEY = "env-key-0123456789abcdef"
FILE_KEY = "file-key-0123456789abcdef"
ROTATED_KEY = "rotated-key-0123456789abcdef"
TIMEOUT_S = 2.5


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_path):
    keys = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    keys.write_text(f"# raybooth API keys\n{FILE_KEY}\n")
    args = {
        "text_to_image": [{"name": "tiny", "model": "tiny", "warmup_steps": 1}],
        "inpainting": [],
        "limits": {"request_timeout_s": TIMEOUT_S, "retry_after_s": 3, "max_side": 256},
        "auth": {"api_keys_env": "RAYBOOTH_TEST_API_KEYS", "api_keys_file": str(keys), "required": True},
    }
    deployments = [
        # The key variable is set where the ingress runs (as on a cluster node), not in this process.
        {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1,
                                                  "runtime_env": {"env_vars": {"RAYBOOTH_TEST_API_KEYS": ENV_KEY}}}},
        # One request at a time and a queue of one: the third concurrent request is refused.
        {"name": "TextToImage", "max_ongoing_requests": 1, "max_queued_requests": 1,
         "user_config": {"max_batch_size": 1, "batch_wait_timeout_s": 0},
         "ray_actor_options": {"num_cpus": 1}, "graceful_shutdown_timeout_s": 2},
    ]
    url = start_app(serve_config(args, deployments, free_port()))
    yield SimpleNamespace(url=url, keys=keys)
    stop_serve()


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_guard_every_route_but_healthz(guarded):
    url = guarded.url
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    assert requests.get(url + "/docs", timeout=10).status_code == 200

    for headers in ({}, _auth("wrong-key-0123456789abcdef"), {"Authorization": ENV_KEY},
                    {"Authorization": f"Basic {ENV_KEY}"}, _auth(ENV_KEY[:-1])):
        resp = requests.get(url + "/v1/models", headers=headers, timeout=10)
        assert resp.status_code == 401, headers
        assert resp.headers["www-authenticate"] == "Bearer"
        assert resp.json()["error"]["code"] == "unauthorized"
    denied = generate(url, prompt="a", steps=1)
    assert denied.status_code == 401

    # A key from the environment variable and one from the file both work.
    assert requests.get(url + "/v1/models", headers=_auth(ENV_KEY), timeout=10).status_code == 200
    assert requests.get(url + "/v1/models", headers=_auth(FILE_KEY), timeout=10).status_code == 200
    ok = generate(url, prompt="a photo of a toy", steps=2, seed=1, headers=_auth(FILE_KEY))
    assert ok.status_code == 200, ok.text

    # Rotating the file: the new key works at once, the old one stops working.
    guarded.keys.write_text(f"{ROTATED_KEY}\n")
    stat = guarded.keys.stat()
    os.utime(guarded.keys, (stat.st_atime, stat.st_mtime + 5))
    assert requests.get(url + "/v1/models", headers=_auth(ROTATED_KEY), timeout=10).status_code == 200
    assert requests.get(url + "/v1/models", headers=_auth(FILE_KEY), timeout=10).status_code == 401
    assert requests.get(url + "/v1/models", headers=_auth(ENV_KEY), timeout=10).status_code == 200


def test_a_full_queue_answers_503_with_retry_after(guarded):
    headers = _auth(ENV_KEY)
    bodies = [dict(prompt=f"queue {i}", seed=i, steps=6) for i in range(8)]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: generate(guarded.url, headers=headers, **b), bodies))
    statuses = [r.status_code for r in responses]
    assert 503 in statuses, statuses
    assert 200 in statuses, statuses  # the ones that got a place are served
    assert set(statuses) <= {200, 503}, [r.text[:200] for r in responses]
    for resp in responses:
        if resp.status_code == 503:
            assert resp.headers["retry-after"] == "3"
            assert resp.json()["error"]["code"] == "overloaded"
    # Once the queue drains, the server takes requests again.
    assert generate(guarded.url, headers=headers, prompt="after", steps=2, seed=3).status_code == 200


def test_a_request_larger_than_the_batch_limit_is_split_not_refused(guarded):
    # max_batch_size is 1 image here: n=3 runs as three batch entries of one request.
    resp = generate(guarded.url, headers=_auth(ENV_KEY), prompt="three", steps=2, seed=40, n=3)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [d["seed"] for d in body["data"]] == [40, 41, 42]
    assert body["batch_size"] == 1


def test_a_generation_past_the_timeout_is_a_504(guarded):
    # 192 px and 30 steps take far longer than the 2.5 s limit on a CPU.
    started = time.monotonic()
    resp = generate(guarded.url, headers=_auth(ENV_KEY), prompt="slow", steps=30, width=192, height=192, seed=1)
    elapsed = time.monotonic() - started
    assert resp.status_code == 504, resp.text
    err = resp.json()["error"]
    assert err["code"] == "timeout" and str(TIMEOUT_S) in err["message"]
    assert elapsed < TIMEOUT_S + 10
