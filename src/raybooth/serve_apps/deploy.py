"""Serve config files (the format `serve run` / `serve deploy` / a RayService read), deployed from
this process: what `raybooth serve`, the demo, the benchmarks and the tests use.

The config goes to the Serve controller exactly as `serve deploy` sends it (the controller builds
the application from `import_path` + `args` and applies the `deployments:` overrides), so a config
that works here works with `serve deploy` on a cluster, and a `user_config` change reconfigures
running replicas in place.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from raybooth.platform.config import read_yaml_mapping
from raybooth.platform.errors import ConfigError, UserError

DEFAULT_APP = "raybooth"


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """Read and check a Serve config file; errors name the file and the key."""
    data = read_yaml_mapping(path, "Serve config")
    check_serve_config(data, str(path))
    return data


def check_serve_config(data: dict[str, Any], source: str = "Serve config") -> None:
    """Serve's own schema, then raybooth's `args` schema for every raybooth application."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from raybooth.serve_apps.settings import load_args

    if not isinstance(data, dict) or "applications" not in data:
        raise ConfigError(f"{source}: expected a Serve config with an `applications:` list", field="applications")
    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: '{where}': {err['msg']}", field=where) from None
    for i, app in enumerate(data["applications"]):
        if app.get("import_path", "").startswith("raybooth.serve_apps.app:"):
            load_args(app.get("args") or {}, f"{source}: applications[{i}].args")


def with_http(config: dict[str, Any], host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """A copy of the config with the HTTP host/port replaced (when given)."""
    config = copy.deepcopy(config)
    http = dict(config.get("http_options") or {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    config["http_options"] = http
    return config


def deploy(config: dict[str, Any]) -> None:
    """Start Serve with the config's HTTP options (if not running) and submit the applications."""
    from ray.serve._private import api as serve_private_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    # What `serve run <config>` does: start Serve with the config's options, then hand the
    # config to the controller.
    client = serve_private_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)


def wait_running(names: list[str], timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
    """Block until the applications are RUNNING; a failed deployment raises with Serve's reason."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        status = serve.status()
        pending = []
        for name in names:
            app = status.applications.get(name)
            state = str(app.status) if app else "NOT_STARTED"
            last[name] = state
            if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
                raise UserError(f"Serve application {name!r} failed to deploy: {_reason(app)}", field="config")
            if not state.endswith("RUNNING"):
                pending.append(name)
        if not pending:
            return
        time.sleep(poll_s)
    raise UserError(f"Serve applications not running after {timeout_s:.0f} s: {last}", field="config")


def _reason(app: Any) -> str:
    lines = [app.message] if getattr(app, "message", "") else []
    for dep_name, dep in (getattr(app, "deployments", {}) or {}).items():
        if getattr(dep, "message", ""):
            lines.append(f"{dep_name}: {dep.message}")
    text = "\n".join(lines) or "(no message)"
    # Serve's messages carry whole tracebacks; the last lines name the cause.
    tail = [line for line in text.splitlines() if line.strip()][-12:]
    return "\n".join(tail)


def app_url(config: dict[str, Any], app: str = DEFAULT_APP) -> str:
    http = config.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    port = http.get("port", 8000)
    prefix = "/"
    for entry in config.get("applications", []):
        if entry.get("name") == app:
            prefix = entry.get("route_prefix") or "/"
    return f"http://{host}:{port}{prefix.rstrip('/')}"


def wait_http(url: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Poll `url` (e.g. .../healthz) until it answers 200; return its JSON."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read() or b"{}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = exc
            time.sleep(0.3)
    raise UserError(f"{url} did not answer within {timeout_s:.0f} s ({last})")


def app_names(config: dict[str, Any]) -> list[str]:
    return [entry.get("name", "default") for entry in config.get("applications", [])]
