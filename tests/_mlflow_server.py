"""A real `mlflow server` process for tests: SQLite backend, proxied artifacts
(`--serve-artifacts --artifacts-destination`), bound to 127.0.0.1 on a free port. It can be stopped
and started again on the same port and store (what the resilience tests do)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "server.log"

    def start(self, timeout_s: float = 90.0) -> "MlflowServer":
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        log = open(self.log_path, "ab")
        # Its own session: stop() ends the server and the workers it forked, nothing else.
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "MLFLOW_TRACKING_URI": ""})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout_s} s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
        # The port must refuse connections before we report the server as down.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                requests.get(self.url + "/health", timeout=0.5)
                time.sleep(0.2)
            except requests.RequestException:
                return


_SHARED: MlflowServer | None = None


def shared_server() -> MlflowServer:
    """One server for all MLflow test modules in this pytest process (it starts in ~15 s, so it is
    started once); stopped when the process exits. A test that stops it starts it again."""
    import atexit
    import tempfile

    global _SHARED
    if _SHARED is None:
        _SHARED = MlflowServer(Path(tempfile.mkdtemp(prefix="raybooth-mlflow-server-")))
        atexit.register(_SHARED.stop)
    if _SHARED.proc is None or _SHARED.proc.poll() is not None:
        _SHARED.proc = None
        _SHARED.start()
    return _SHARED
