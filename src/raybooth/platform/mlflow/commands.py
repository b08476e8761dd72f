"""`raybooth models list|promote` and `raybooth mlflow-ui`: the registry and the tracking store from
the command line (registered in raybooth.cli.PART_COMMANDS; MLflow itself is imported only when a
command runs)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone

from raybooth.platform.errors import UserError


def register_models(subparsers) -> None:
    p = subparsers.add_parser("models", help="list registered models, move aliases (MLflow registry)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else SQLite in $RAYBOOTH_HOME)")
    sub = p.add_subparsers(dest="models_command", required=True)
    ls = sub.add_parser("list", help="registered models: versions, aliases, final metrics")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_models_list)
    pr = sub.add_parser("promote", help="point an alias (e.g. champion) at a version")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--alias", default="champion")
    pr.set_defaults(func=cmd_models_promote)


def register_ui(subparsers) -> None:
    p = subparsers.add_parser("mlflow-ui", help="open the MLflow UI on the embedded tracking store")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1,
                   help="server processes (MLflow's default is 4; one is plenty for one user)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback: the UI has no authentication)")
    p.set_defaults(func=cmd_mlflow_ui)


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def cmd_models_list(args: argparse.Namespace) -> int:
    from raybooth.platform.mlflow.registry import list_models
    from raybooth.platform.mlflow.store import resolve_tracking_uri

    models = list_models(args.tracking_uri)
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print(f"no registered models in {resolve_tracking_uri(args.tracking_uri)}")
        return 0
    rows = [("MODEL", "VERSION", "ALIASES", "CREATED (UTC)", "METRICS", "RUN")]
    for model in models:
        for v in model["versions"]:
            metrics = " ".join(f"{k}={val}" for k, val in sorted(v["metrics"].items())) or "-"
            aliases = ",".join(f"@{a}" for a in v["aliases"]) or "-"
            rows.append((model["name"], v["version"], aliases, _when(v["created"]), metrics,
                         v["run_id"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    from raybooth.platform.mlflow.registry import promote

    result = promote(args.name, args.version, args.alias, args.tracking_uri)
    before = f" (was version {result.previous_version})" if result.previous_version else ""
    print(f"{result.model_uri} -> version {result.version}{before}")
    return 0


def ui_command(host: str, port: int, workers: int = 1) -> list[str]:
    """`mlflow ui` on the embedded store (or the store MLFLOW_TRACKING_URI names, if a database)."""
    from raybooth.platform.mlflow.store import (
        default_artifact_root,
        resolve_tracking_uri,
    )

    uri = resolve_tracking_uri(None)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", host, "--port", str(port), "--workers", str(workers)]
    root = default_artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    return cmd


def cmd_mlflow_ui(args: argparse.Namespace) -> int:
    from raybooth.platform.mlflow.store import (
        client_for,
        is_http,
        resolve_tracking_uri,
        sqlite_path,
    )

    uri = resolve_tracking_uri(None)
    if is_http(uri):
        print(f"MLFLOW_TRACKING_URI points at a server; its UI is {uri}")
        return 0
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535 (got {args.port})", field="port")
    if sqlite_path(uri) is not None:
        client_for(uri)  # creates the folder, so the UI starts on a fresh machine too
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1 (got {args.workers})", field="workers")
    cmd = ui_command(args.host, args.port, args.workers)
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
