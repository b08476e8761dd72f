"""What travels with a submitted job: the working directory and a few environment variables.

The cluster runs raybooth from its image (docker/Dockerfile), with the dependencies pinned there;
uploading the package as well would run this checkout's code on the image's libraries, a pairing
no one tested. What the job does need from here is the working directory: the config file and
what it names by relative path (the instance photos, e.g. examples/demo-subject). Ray unpacks it
on the cluster and the job runs in it, so relative paths mean the same there as here. Ray skips
what .gitignore lists (runs/, .venv/, mlruns/ …); the excludes below cover the rest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raybooth.platform.errors import UserError

EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "node_modules",
            "demo-output", "runs", "mlruns", "mlartifacts", "*.db"]

# Passed on when set here: where runs are tracked, and how the Hub is reached. Not secrets.
PASS_THROUGH = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")
# A job's runtime env is readable by anyone who can list the cluster's jobs (dashboard, API):
# these belong in the cluster's own environment (a Kubernetes Secret, the node's env), not here.
SECRETS = ("RAY_AUTH_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD",
           "MLFLOW_TRACKING_TOKEN", "RAYBOOTH_API_KEYS", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
ALWAYS = {
    # A job's stdout is a file: without this Python buffers it and `--follow` shows nothing for minutes.
    "PYTHONUNBUFFERED": "1",
}


def working_dir(value: str | os.PathLike) -> Path:
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"--working-dir: {value} is not a directory", field="working_dir")
    return path


def config_in_working_dir(config: str, root: Path) -> str:
    """The config's path relative to the uploaded working directory (POSIX form, for the cluster)."""
    path = Path(config).expanduser()
    if not path.is_file():
        raise UserError(f"--config: {config} does not exist (or is not a file)", field="config")
    resolved = path.resolve()
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        raise UserError(
            f"--config: {config} is outside the working directory {root}, which is what travels "
            "with the job; move the file into it or pass --working-dir",
            field="config",
        ) from None


def env_vars(extra: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """PASS_THROUGH variables set here, then each `--env KEY` (value from here) or `KEY=VALUE`."""
    environ = dict(os.environ if environ is None else environ)
    out = {name: environ[name] for name in PASS_THROUGH if environ.get(name)}
    for item in extra:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not name or not name.replace("_", "a").isalnum():
            raise UserError(f"--env {item!r}: expected NAME or NAME=VALUE", field="env")
        if name in SECRETS:
            raise UserError(
                f"--env {name}: a secret would be readable in the job's runtime environment by "
                "anyone who can list the cluster's jobs; set it on the cluster instead (its nodes' "
                "environment, or a Kubernetes Secret — see k8s/README.md)",
                field="env",
            )
        if not sep:
            if name not in environ:
                raise UserError(f"--env {name}: not set in this shell; give --env {name}=VALUE", field="env")
            value = environ[name]
        out[name] = value
    out.update(ALWAYS)
    return out


def build(root: Path, variables: dict[str, str]) -> dict[str, Any]:
    return {"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": variables}


def local_tracking_note(variables: dict[str, str], address: str) -> str | None:
    """A tracking URI that is a file on this machine means nothing to a remote cluster."""
    uri = variables.get("MLFLOW_TRACKING_URI", "")
    loopback = any(h in address for h in ("://127.", "://localhost", "://[::1]"))
    if not loopback and (uri.startswith(("sqlite:", "file:", "/", "./")) or (uri and "://" not in uri)):
        return (f"MLFLOW_TRACKING_URI={uri} is a file on this machine; the cluster's nodes write to "
                "their own copy. Use a tracking server every node reaches (http://mlflow:5000)")
    return None
