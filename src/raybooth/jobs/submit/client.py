"""The cluster a job goes to: its dashboard address, its token, and a Jobs SDK client.

Ray 2.60 clusters run with token authentication (`RAY_AUTH_MODE=token`). The token is looked up
the way Ray's own tools do — `RAY_AUTH_TOKEN`, else the file `RAY_AUTH_TOKEN_PATH` names, else
`~/.ray/auth_token` — and is sent as a bearer header whether or not `RAY_AUTH_MODE` is set here,
so a user who only exported the token is not turned away. The token never goes into a job's
runtime environment (anyone who can list jobs can read that).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from raybooth.platform.errors import UserError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

DASHBOARD_PORT = 8265
# Ray's own variables for the Jobs API address, in the order Ray's job CLI reads them.
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
CONNECT_TIMEOUT_S = 10.0


def resolve_address(value: str | None) -> str:
    """`http(s)://host:port` of the cluster's dashboard (Jobs API), from --address or Ray's env."""
    source = "--address"
    if not value:
        for name in ADDRESS_ENV:
            candidate = os.environ.get(name, "")
            if candidate.startswith(("http://", "https://")):
                value, source = candidate, name
                break
    if not value:
        raise UserError(
            "--address is required: the URL of the cluster's Ray dashboard, e.g. "
            f"--address http://HEAD:{DASHBOARD_PORT} (or set RAY_API_SERVER_ADDRESS)",
            field="address",
        )
    if value.startswith("ray://"):
        raise UserError(
            f"{source}: {value!r} is a Ray Client address; jobs are submitted to the dashboard: "
            f"http://HEAD:{DASHBOARD_PORT}",
            field="address",
        )
    parts = urlsplit(value if "://" in value else f"//{value}")
    if parts.scheme not in ("http", "https"):
        hint = f"http://{value}" if not parts.scheme else f"http://HEAD:{DASHBOARD_PORT}"
        raise UserError(
            f"{source}: {value!r} is not a dashboard URL; give http(s)://HOST:PORT, e.g. {hint}",
            field="address",
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or (parts.path not in ("", "/")):
        raise UserError(
            f"{source}: {value!r} is not a dashboard URL; give http(s)://HOST:PORT, e.g. "
            f"http://HEAD:{DASHBOARD_PORT}",
            field="address",
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port or DASHBOARD_PORT}"


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, for messages (never the token itself)


def find_token() -> Token | None:
    """The cluster token as Ray's tools find it, or None."""
    value = os.environ.get(TOKEN_ENV, "").strip()
    if value:
        return Token(value, TOKEN_ENV)
    named = os.environ.get(TOKEN_PATH_ENV)
    for path, source in ((named, TOKEN_PATH_ENV), (str(DEFAULT_TOKEN_FILE), str(DEFAULT_TOKEN_FILE))):
        if not path:
            continue
        file = Path(path).expanduser()
        if file.is_file():
            text = file.read_text().strip()
            if text:
                return Token(text, f"{source} ({file})" if source == TOKEN_PATH_ENV else source)
        elif source == TOKEN_PATH_ENV:
            raise UserError(f"{TOKEN_PATH_ENV} names {file}, which is not a file", field=TOKEN_PATH_ENV)
    return None


def _no_token_message(address: str, token: Token | None, status: int) -> str:
    if token is None:
        return (f"the cluster at {address} requires a token (Ray token authentication): set "
                f"{TOKEN_ENV}, or put it in {DEFAULT_TOKEN_FILE} (on the head node, `ray "
                "get-auth-token` prints it; on Kubernetes it is the RayCluster's auth Secret)")
    return (f"the cluster at {address} rejected the token from {token.source} (HTTP {status}): "
            "it is not this cluster's token")


def probe_dashboard(address: str, headers: dict[str, str], token: Token | None) -> str:
    """GET /api/version with a timeout; returns the cluster's Ray version or raises UserError."""
    import requests

    try:
        resp = requests.get(f"{address}/api/version", headers=headers, timeout=CONNECT_TIMEOUT_S)
    except requests.exceptions.RequestException as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {address} ({type(exc).__name__}): is the head node "
            f"running, and is {urlsplit(address).port} its dashboard port (ray start --head "
            "--dashboard-host …; on Kubernetes, port-forward svc/<cluster>-head-svc 8265)?",
            field="address",
        ) from None
    if resp.status_code in (401, 403):
        raise UserError(_no_token_message(address, token, resp.status_code), field=TOKEN_ENV)
    try:
        return str(resp.json()["ray_version"])
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"{address} answered /api/version with HTTP {resp.status_code} but is not a Ray "
            "dashboard; --address must be the dashboard's URL (port 8265 by default)",
            field="address",
        ) from None


def connect(address: str | None) -> tuple[str, "JobSubmissionClient"]:
    """(normalised address, a Jobs SDK client with the token header) — after a reachability check."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = find_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    probe_dashboard(url, headers, token)
    try:
        return url, JobSubmissionClient(url, headers=headers)
    except Exception as exc:  # the SDK's own checks: connection, version, authentication
        raise UserError(f"cannot use the Ray cluster at {url}: {exc}", field="address") from None


def job_not_found(exc: Exception, job_id: str, address: str) -> UserError | None:
    """Ray's SDK raises RuntimeError('… 404 …') for an unknown job id."""
    text = str(exc)
    if "404" in text or "does not exist" in text:
        return UserError(f"no job {job_id!r} on the cluster at {address} (raybooth jobs list "
                         f"--address {address} shows the jobs)", field="job_id")
    return None
