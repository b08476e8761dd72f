"""`raybooth submit` and `raybooth jobs` against a real two-node cluster started here with
`ray start --head` plus `ray start --address …` on loopback, with token authentication on.

The cluster's nodes run this venv's raybooth (as the image would), with PATH, RAYBOOTH_HOME (the
tiny models) and a token of their own, but without MLFLOW_TRACKING_URI: the job gets that only
through `submit`'s runtime env. The cluster lives only as long as this module's tests.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raybooth.jobs.train.handoff import TrainingSummary

from _serve_support import free_port, free_ports, stop_ray_cluster, wait_until

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = "configs/train/tiny.yaml"

pytestmark = pytest.mark.ray


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def _raybooth(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raybooth.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


# ---------------------------------------------------------------------------------------------
# Mistakes a user makes are caught here, before any cluster is contacted (or when it cannot be).


def test_user_errors_name_the_field_and_exit_2(tmp_path):
    env = _clean_env(HOME=str(tmp_path))
    port = free_port()  # nothing listens there
    outside = tmp_path / "outside.yaml"
    outside.write_text("model: tiny\n")
    cases = [
        (["submit", "train", "--config", "configs/train/nope.yaml", "--address", f"http://127.0.0.1:{port}"],
         "--config: configs/train/nope.yaml does not exist"),
        (["submit", "train", "--config", TINY, "--address", "127.0.0.1:8265"], "http://127.0.0.1:8265"),
        (["submit", "train", "--config", TINY, "--address", "ray://127.0.0.1:10001"], "Ray Client address"),
        (["submit", "train", "--config", TINY], "--address is required"),
        (["submit", "train", "--config", TINY, "--address", f"http://127.0.0.1:{port}"],
         f"cannot reach the Ray cluster at http://127.0.0.1:{port}"),
        (["submit", "train", "--config", str(outside), "--address", f"http://127.0.0.1:{port}"],
         "outside the working directory"),
        (["submit", "train", "--config", TINY, "--env", "HF_TOKEN=x", "--address", f"http://127.0.0.1:{port}"],
         "--env HF_TOKEN: a secret"),
        (["jobs", "list", "--address", f"http://127.0.0.1:{port}"], "cannot reach the Ray cluster"),
    ]
    for args, expected in cases:
        out = _raybooth(args, env, timeout=60)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert expected in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_unknown_submit_command_is_refused_by_the_parser(tmp_path):
    out = _raybooth(["submit", "serve", "--config", TINY, "--address", "http://127.0.0.1:1"],
                    _clean_env(HOME=str(tmp_path)), timeout=60)
    assert out.returncode == 2 and "invalid choice: 'serve'" in out.stderr


def test_summary_path_outcome_and_version_rules():
    from raybooth.jobs.submit.command import entrypoint
    from raybooth.jobs.submit.follow import exit_code, summary_path
    from raybooth.jobs.submit.versions import VersionMismatch, Versions, check_match
    from raybooth.cli import build_parser

    logs = "step 4/4 loss 0.1\nmodel: /runs/x/model\n/runs/x/summary.json\n(raylet) a message\n"
    assert summary_path(logs) == "/runs/x/summary.json"
    assert summary_path("s3://bucket/sweeps/a/sweep.json\n") == "s3://bucket/sweeps/a/sweep.json"
    assert summary_path("wrote /runs/x/summary.json and more\n") is None
    assert exit_code("SUCCEEDED", 0) == 0
    assert exit_code("FAILED", 2) == 2 and exit_code("FAILED", None) == 1 and exit_code("STOPPED", None) == 1

    same = Versions(ray="2.60.0", raybooth="0.1.0")
    check_match(same, Versions(ray="2.60.0", raybooth="0.1.0", python="3.11.7"), "http://h:8265")
    with pytest.raises(VersionMismatch, match="Ray 2.59.0"):
        check_match(same, Versions(ray="2.59.0", raybooth="0.1.0"), "http://h:8265")
    with pytest.raises(VersionMismatch, match="raybooth is not installed on the cluster"):
        check_match(same, Versions(ray="2.60.0", raybooth=None), "http://h:8265")

    # What runs on the cluster is a command raybooth's own parser accepts, spaces and all.
    import shlex

    words = shlex.split(entrypoint("train", "configs/train/tiny.yaml",
                                   ["subject.instance_prompt=a photo of sks dog", "train.max_steps=2"], []))
    assert words[0] == "raybooth"
    args = build_parser(words[1:]).parse_args(words[1:])
    assert args.overrides == ["subject.instance_prompt=a photo of sks dog", "train.max_steps=2"]


# ---------------------------------------------------------------------------------------------
# A real cluster: head + one more node, token authentication on.


class Cluster:
    def __init__(self, address: str, token: str, temp_dir: str):
        self.address = address
        self.token = token
        self.temp_dir = temp_dir

    def client_env(self, **extra: str) -> dict[str, str]:
        return _clean_env(RAY_AUTH_TOKEN=self.token, **extra)


def _start(args: list[str], env: dict[str, str], node_dir: str, tries: int = 3) -> None:
    """`ray start … --temp-dir node_dir`. Ray gives a raylet a fixed 30 s to register; on a host
    this busy that is sometimes too little, so a node that timed out is stopped (its processes
    only, by its temp dir) and started again."""
    for attempt in range(1, tries + 1):
        out = subprocess.run([str(BIN / "ray"), "start", *args, "--temp-dir", node_dir],
                             capture_output=True, text=True, timeout=180, env=env)
        if out.returncode == 0:
            return
        if "timed out during startup" not in out.stderr + out.stdout or attempt == tries:
            raise AssertionError(f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        stop_ray_cluster(node_dir)


@pytest.fixture(scope="module")
def cluster(tiny_path):
    import ray

    ray.shutdown()  # no local Ray of this process may outlive into (or connect to) this cluster
    temp_dir = tempfile.mkdtemp(prefix="rbsub-", dir="/tmp")  # short: Unix socket paths are limited
    token = secrets.token_hex(16)
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                     PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_TRACKING_URI", None)  # the job must get it from `submit`
    gcs, dash, *ports = free_ports(16)
    common = ["--disable-usage-stats", "--num-cpus", "2"]
    try:
        _start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dash), "--include-dashboard=true",
                "--dashboard-agent-listen-port", str(ports[0]), "--dashboard-agent-grpc-port", str(ports[1]),
                "--metrics-export-port", str(ports[2]), "--runtime-env-agent-port", str(ports[3]),
                "--node-manager-port", str(ports[4]), "--object-manager-port", str(ports[5]),
                "--ray-client-server-port", str(ports[6]), *common], env, temp_dir)
        _start(["--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
                "--dashboard-agent-listen-port", str(ports[7]), "--dashboard-agent-grpc-port", str(ports[8]),
                "--metrics-export-port", str(ports[9]), "--runtime-env-agent-port", str(ports[10]),
                "--node-manager-port", str(ports[11]), "--object-manager-port", str(ports[12]),
                *common], env,
               # Its own temp dir (inside ours, so stop_ray_cluster finds it): two nodes sharing
               # one would share runtime_resources/, and one node's cleanup would delete the
               # job's unpacked working directory under the other's driver.
               f"{temp_dir}/n2")
        yield Cluster(f"http://127.0.0.1:{dash}", token, temp_dir)
    finally:
        stop_ray_cluster(temp_dir)


def _jobs(cluster: Cluster) -> str:
    out = _raybooth(["jobs", "list", "--address", cluster.address], cluster.client_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _job_ids(cluster: Cluster) -> set[str]:
    return {line.split()[0] for line in _jobs(cluster).splitlines()[1:] if line.strip()}


# Setup (the cluster, first use of the tiny models) counts too; generous for a shared, busy host.
@pytest.mark.timeout(540)
def test_a_tiny_training_job_runs_on_two_nodes_and_streams_its_logs(cluster, tmp_path):
    tracking = f"sqlite:///{tmp_path}/cluster-mlflow.db"
    overrides = {
        "run.storage_path": str(tmp_path / "runs"), "run.name": "submitted",
        "priors.class_data_dir": str(tmp_path / "class-images"), "priors.num_class_images": "2",
        "priors.batch_size": "2", "priors.steps": "2",
        "train.max_steps": "3", "train.checkpoint_every": "3", "train.validation_steps": "2",
        "train.log_every": "1", "scaling.placement_strategy": "STRICT_SPREAD",  # one worker per node
    }
    args = ["submit", "train", "--config", TINY, "--address", cluster.address]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    started = time.monotonic()
    try:
        out = _raybooth(args, cluster.client_env(MLFLOW_TRACKING_URI=tracking), timeout=420)
    except subprocess.TimeoutExpired as exc:  # say where the job was, not only that it was slow
        seen = (exc.stdout or b"").decode(errors="replace")[-3000:] + (exc.stderr or b"").decode(errors="replace")[-2000:]
        pytest.fail(f"the job did not end in {exc.timeout} s; the client had printed:\n{seen}\njobs:\n{_jobs(cluster)}")
    took = time.monotonic() - started
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-3000:]}"

    assert "(Ray 2.60.0, raybooth" in out.stderr  # the cluster's versions, checked equal
    job_id = out.stderr.split("job ", 1)[1].split()[0]
    assert job_id.startswith("raybooth-train-") and f"job {job_id} SUCCEEDED" in out.stderr
    assert f"raybooth jobs stop {job_id}" in out.stderr
    # The job's own output streamed through: progress of every step, then its summary path last.
    for step in (1, 2, 3):
        assert re.search(rf"step\s+{step}/3\s+loss", out.stdout), out.stdout[-3000:]
    summary_file = Path(out.stdout.strip().splitlines()[-1])
    assert summary_file == tmp_path / "runs" / "submitted" / "summary.json"
    summary = TrainingSummary.read(summary_file)
    assert summary.steps == 3 and summary.num_workers == 2 and summary.model_path.is_dir()
    # MLFLOW_TRACKING_URI reached the job only through submit's runtime env.
    with sqlite3.connect(tmp_path / "cluster-mlflow.db") as db:
        runs = {row[0] for row in db.execute("select run_uuid from runs")}
    assert summary.mlflow_run_id in runs
    print(f"tiny training job end to end: {took:.1f} s")

    listed = _jobs(cluster)
    assert job_id in listed and "SUCCEEDED" in listed and "raybooth-versions-" not in listed
    logs = _raybooth(["jobs", "logs", job_id, "--address", cluster.address], cluster.client_env())
    assert logs.returncode == 0 and str(summary_file) in logs.stdout


@pytest.mark.timeout(180)
def test_a_bad_config_key_fails_on_the_cluster_with_its_message(cluster):
    out = _raybooth(["submit", "train", "--config", TINY, "--set", "train.max_stesp=3", "--address", cluster.address],
                    cluster.client_env(), timeout=170)
    assert out.returncode == 2, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"  # the command's own exit status
    job_id = out.stderr.split("job ", 1)[1].split()[0]
    assert f"job {job_id} FAILED" in out.stderr
    assert "max_stesp" in out.stdout  # raybooth train's message, from the cluster's log
    assert "summary" not in out.stderr


@pytest.mark.timeout(180)
def test_a_version_mismatch_is_refused_before_anything_is_submitted(cluster, tmp_path):
    # This client reports another raybooth: a package that shadows the real one's version only.
    shadow = tmp_path / "shadow" / "raybooth"
    shadow.mkdir(parents=True)
    real = REPO / "src" / "raybooth"
    (shadow / "__init__.py").write_text(f'__version__ = "9.9.9"\n__path__.append({str(real)!r})\n')
    before = _job_ids(cluster)
    out = _raybooth(["submit", "train", "--config", TINY, "--address", cluster.address],
                    cluster.client_env(PYTHONPATH=str(tmp_path / "shadow")), timeout=170)
    assert out.returncode == 2, out.stderr
    assert "raybooth 0.1.0" in out.stderr and "raybooth 9.9.9" in out.stderr
    assert "nothing was submitted" in out.stderr and "Traceback" not in out.stderr
    assert _job_ids(cluster) == before


@pytest.mark.timeout(180)
def test_token_required_ctrl_c_detaches_and_jobs_stop_stops(cluster, tmp_path):
    # No token anywhere (HOME without ~/.ray/auth_token): a clear message, exit 2.
    no_token = _raybooth(["jobs", "list", "--address", cluster.address], _clean_env(HOME=str(tmp_path)))
    assert no_token.returncode == 2 and "requires a token" in no_token.stderr, no_token.stderr
    wrong = _raybooth(["jobs", "list", "--address", cluster.address],
                      _clean_env(HOME=str(tmp_path), RAY_AUTH_TOKEN="not-the-token"))
    assert wrong.returncode == 2 and "rejected the token from RAY_AUTH_TOKEN" in wrong.stderr, wrong.stderr

    # A job that would run for long: Ctrl-C detaches the client, the job keeps running.
    log = tmp_path / "submit.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raybooth.cli", "submit", "priors", "--config", TINY, "--address", cluster.address,
             "--set", f"priors.class_data_dir={tmp_path}/class-images", "--set", "priors.num_class_images=5000"],
            stdout=sink, stderr=subprocess.STDOUT, env=cluster.client_env(), cwd=REPO)
    try:
        assert wait_until(lambda: "stop it: raybooth jobs stop" in log.read_text() or proc.poll() is not None, 120)
        assert proc.poll() is None, log.read_text()
        job_id = log.read_text().split("job ", 1)[1].split()[0]
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert f"detached from job {job_id}; it keeps running" in text
    assert f"raybooth jobs stop {job_id} --address {cluster.address}" in text
    assert any(line.startswith(job_id) and ("RUNNING" in line or "PENDING" in line)
               for line in _jobs(cluster).splitlines())

    stopped = _raybooth(["jobs", "stop", job_id, "--address", cluster.address], cluster.client_env())
    assert stopped.returncode == 0 and f"job {job_id} STOPPED" in stopped.stderr, stopped.stderr
    assert any(line.startswith(job_id) and "STOPPED" in line for line in _jobs(cluster).splitlines())
    missing = _raybooth(["jobs", "logs", "raybooth-train-nope", "--address", cluster.address], cluster.client_env())
    assert missing.returncode == 2 and "no job 'raybooth-train-nope'" in missing.stderr, missing.stderr
