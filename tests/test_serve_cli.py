"""The command lines a user runs: `raybooth serve` in the foreground (Ctrl-C stops it cleanly),
and Ray's own `serve deploy` / `serve status` with configs/serve/local.yaml against a cluster
started by `ray start --head`, including a `user_config` change applied to running replicas."""

from __future__ import annotations

import concurrent.futures as cf
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from _serve_support import free_port, free_ports, generate, stop_ray_cluster, wait_until

REPO = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = REPO / "configs" / "serve" / "local.yaml"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.ray


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS")}
    env.update(extra)
    return env


def test_raybooth_serve_rejects_a_bad_config_before_starting_anything(tmp_path):
    bad = yaml.safe_load(LOCAL_CONFIG.read_text())
    bad["applications"][0]["args"]["limits"]["max_imagse"] = 4
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "raybooth.cli", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 2
    assert "max_imagse" in out.stderr and "max_images" in out.stderr  # names the key, suggests the fix
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 30  # no Ray was started

    missing = subprocess.run([sys.executable, "-m", "raybooth.cli", "serve", "--config", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, timeout=60, env=_env())
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.timeout(300)
def test_raybooth_serve_runs_in_the_foreground_and_stops_cleanly_on_ctrl_c(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        # Its own session: Ctrl-C in a terminal signals the whole foreground process group.
        proc = subprocess.Popen(
            [sys.executable, "-m", "raybooth.cli", "serve", "--config", str(LOCAL_CONFIG), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: "ready at" in log.read_text() or proc.poll() is not None, 240), log.read_text()[-3000:]
        assert proc.poll() is None, log.read_text()[-3000:]
        assert f"ready at {url}" in log.read_text()
        resp = generate(url, prompt="a photo of a toy robot", steps=2, seed=1)
        assert resp.status_code == 200, resp.text
        group = [p for p in psutil.process_iter() if _pgid(p) == proc.pid]
        assert len(group) > 3  # Ray's processes run in the command's process group

        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "shutting down" in text and "stopped" in text
        # Nothing left behind: no process of the group, and the port is closed.
        assert wait_until(lambda: not [p for p in psutil.process_iter() if _pgid(p) == proc.pid], 30)
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None


# ---------------------------------------------------------------------------------------------


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def _status(dashboard: str, env: dict[str, str]) -> dict:
    """`serve status`, the command a user runs (its YAML)."""
    out = _run([str(BIN / "serve"), "status", "-a", dashboard], env, timeout=60)
    return yaml.safe_load(out.stdout)


def _applications(dashboard: str, env: dict[str, str]) -> dict:
    """The dashboard's Serve REST API, which `serve status` reads: polled without paying a CLI
    process start (~1.4 s of CPU on 2 cores, taken from the replicas starting) per look."""
    resp = requests.get(f"{dashboard}/api/serve/applications/", timeout=30,
                        headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    resp.raise_for_status()
    return resp.json().get("applications") or {}


def _deployed_at(dashboard: str, env: dict[str, str]) -> float:
    try:
        app = _applications(dashboard, env).get("raybooth") or {}
    except requests.RequestException:
        return 0.0
    return float(app.get("last_deployed_time_s") or 0.0)


def _deploy_and_wait(config: dict, tmp: Path, dashboard: str, env: dict[str, str]) -> dict:
    before = _deployed_at(dashboard, env)
    path = tmp / f"serve-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    _run([str(BIN / "serve"), "deploy", str(path), "-a", dashboard], env)
    app: dict = {}
    streak = 0

    def running() -> bool:
        # RUNNING for this deploy (not the one before), twice in a row: the controller has
        # applied the new config to every replica, not merely accepted it.
        nonlocal app, streak
        try:
            app = _applications(dashboard, env).get("raybooth") or {}
        except requests.RequestException:  # the dashboard busy for a moment: look again
            streak = 0
            return False
        assert app.get("status") != "DEPLOY_FAILED", app
        fresh = float(app.get("last_deployed_time_s") or 0) > before
        healthy = all(d.get("status") == "HEALTHY" for d in (app.get("deployments") or {}).values())
        streak = streak + 1 if fresh and app.get("status") == "RUNNING" and healthy else 0
        return streak >= 2

    assert wait_until(running, 240, poll_s=0.5), app
    return app


def _concurrent(url: str, count: int) -> list[dict]:
    with cf.ThreadPoolExecutor(count) as pool:
        responses = list(pool.map(lambda i: generate(url, prompt=f"toy {i}", steps=2, seed=i), range(count)))
    assert [r.status_code for r in responses] == [200] * count, [r.text[:200] for r in responses]
    return [r.json() for r in responses]


@pytest.mark.timeout(480)
def test_serve_deploy_local_config_onto_a_ray_start_cluster(tmp_path, tiny_path, tiny_inpainting_path):
    import ray

    ray.shutdown()  # this test runs its own cluster; the next `ray_local` user starts a fresh one
    # A short temp dir (Unix socket paths are limited) that names this cluster's processes only.
    temp_dir = tempfile.mkdtemp(prefix="rbsd-", dir="/tmp")
    gcs, dash, agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr, client, http = free_ports(10)
    # Token auth with a token of our own: nothing shared with other clusters on this machine.
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        _run([str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
              "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent),
              "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
              "--runtime-env-agent-port", str(env_agent), "--node-manager-port", str(node_mgr),
              "--object-manager-port", str(obj_mgr), "--ray-client-server-port", str(client),
              "--num-cpus", "4", "--include-dashboard=true", "--temp-dir", temp_dir, "--disable-usage-stats"],
             env, timeout=180)

        # configs/serve/local.yaml as it is, on a free port instead of 8000, and with one
        # text-to-image replica (it starts two on a CPU): which replica answers, and the batches
        # it forms, are then observable.
        config = yaml.safe_load(LOCAL_CONFIG.read_text())
        config["http_options"]["port"] = http
        for dep in config["applications"][0]["deployments"]:
            if dep["name"] == "TextToImage":
                dep["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=1)
        _deploy_and_wait(config, tmp_path, dashboard, env)
        # What `serve status` shows a user.
        deployments = _status(dashboard, env)["applications"]["raybooth"]["deployments"]
        assert set(deployments) == {"Ingress", "TextToImage", "Inpainting"}
        assert all(d["status"] == "HEALTHY" for d in deployments.values()), deployments

        url = f"http://127.0.0.1:{http}"
        first = generate(url, prompt="a photo of a toy robot", steps=2, seed=4)
        assert first.status_code == 200, first.text
        replica = first.json()["replica"]

        # A new user_config reaches the running replica: no restart, new batching at once.
        def with_batching(max_batch_size: int, wait_s: float) -> dict:
            changed = yaml.safe_load(yaml.safe_dump(config))
            for dep in changed["applications"][0]["deployments"]:
                if dep["name"] == "TextToImage":
                    dep["user_config"] = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": wait_s}
            return changed

        _deploy_and_wait(with_batching(8, 1.0), tmp_path, dashboard, env)
        batched = _concurrent(url, 4)
        assert {b["replica"] for b in batched} == {replica}
        assert max(b["batch_size"] for b in batched) > 1

        _deploy_and_wait(with_batching(1, 0.0), tmp_path, dashboard, env)
        single = _concurrent(url, 4)
        assert {b["replica"] for b in single} == {replica}
        assert [b["batch_size"] for b in single] == [1, 1, 1, 1]

        # A new model version (here: a changed revision note, as after moving a registry alias)
        # rolls the replicas while a client keeps sending: no request fails, and the answers
        # come from new replicas afterwards.
        rolled = yaml.safe_load(yaml.safe_dump(config))
        rolled["applications"][0]["args"]["text_to_image"][0]["revision_note"] = "promoted v2"
        statuses: list[int] = []
        replicas: list[str] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                resp = generate(url, prompt="during the rollout", steps=2, seed=1, timeout=120)
                statuses.append(resp.status_code)
                if resp.status_code == 200:
                    replicas.append(resp.json()["replica"])

        sender = threading.Thread(target=client)
        sender.start()
        try:
            _deploy_and_wait(rolled, tmp_path, dashboard, env)
            assert wait_until(lambda: bool(replicas) and replicas[-1] != replica, 60)
        finally:
            stop.set()
            sender.join(timeout=150)
        assert statuses and set(statuses) == {200}, statuses
        assert replicas[-1] != replica
    finally:
        # No `serve shutdown` first (6 s of replicas draining): the whole cluster goes.
        stop_ray_cluster(temp_dir)
