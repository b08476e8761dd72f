"""Helpers for the Serve tests: free ports, Serve configs for tiny apps, HTTP calls, image decoding."""

from __future__ import annotations

import base64
import io
import socket
import time
from typing import Any

import numpy as np
import requests
from PIL import Image

IMPORT_PATH = "raybooth.serve_apps.app:build_app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all held open while choosing, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def serve_config(args: dict[str, Any], deployments: list[dict[str, Any]], port: int,
                 name: str = "raybooth") -> dict[str, Any]:
    # A stopping replica looks for requests in flight every 0.1 s (Serve's default: 2 s): each
    # module's Serve shutdown then takes ~1.4 s instead of ~4.5 (measured). Still graceful.
    deployments = [{"graceful_shutdown_wait_loop_s": 0.1, **d} for d in deployments]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": name, "route_prefix": "/", "import_path": IMPORT_PATH,
            "args": args, "deployments": deployments,
        }],
    }


def ensure_ray() -> None:
    """The same shared local Ray that the `ray_local` fixture starts (module-scoped fixtures
    cannot use that function-scoped fixture, so they start it the same way)."""
    import ray

    from conftest import RAY_CPUS

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)


def start_app(config: dict[str, Any], timeout_s: float = 240) -> str:
    from raybooth.serve_apps.deploy import app_url, deploy, wait_http, wait_running

    ensure_ray()
    deploy(config)
    wait_running([a["name"] for a in config["applications"]], timeout_s)
    url = app_url(config)
    wait_http(url + "/healthz", 60)
    return url


def stop_serve() -> None:
    from ray import serve

    try:
        serve.shutdown()
    except Exception:
        pass


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def generate(url: str, timeout: float = 120, headers: dict | None = None, **body) -> requests.Response:
    return requests.post(url + "/v1/images/generations", json=body, timeout=timeout, headers=headers)


def wait_until(predicate, timeout_s: float, poll_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False


def stop_ray_cluster(temp_dir: str, grace_s: float = 3.0) -> int:
    """Stop the Ray cluster that `ray start --temp-dir <temp_dir>` started, and nothing else.

    `ray stop` would end every Ray process of this user on the machine (other tests' clusters
    too), so instead: the processes whose command line names our temp dir (GCS, raylet,
    dashboard, monitors) and all their descendants (workers, agents, replicas). SIGTERM, then
    SIGKILL for what is left after `grace_s`: some of Ray's processes outlive SIGTERM by 10 s and
    more, and a test cluster has nothing to save."""
    import psutil

    me = psutil.Process()
    spare = {me.pid, *(p.pid for p in me.parents())}  # never this test process or its callers
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid in spare:
                continue
            if any(temp_dir in part for part in (proc.info["cmdline"] or [])):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    victims = {}
    for proc in roots:
        victims[proc.pid] = proc
        try:
            for child in proc.children(recursive=True):
                if child.pid not in spare:
                    victims[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    for proc in victims.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(victims)
