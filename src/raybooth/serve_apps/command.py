"""`raybooth serve --config configs/serve/local.yaml`: the Serve app in the foreground.

Starts (or joins, with --address) a Ray cluster, deploys the config's applications as
`serve deploy` would, waits until they are running, prints where they are, and stays until
Ctrl-C (or SIGTERM), then shuts Serve and Ray down and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from raybooth.platform.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the Serve app (text-to-image, inpainting, LoRA subjects) in the foreground",
        description="Run the raybooth Serve app in the foreground until Ctrl-C (or SIGTERM).",
    )
    p.add_argument("--config", default="configs/serve/local.yaml", help="a Serve config file")
    p.add_argument("--host", default=None, help="HTTP host (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, else 8000)")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (default: $RAY_ADDRESS, else a new local one)")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="logical CPUs of a new local Ray (default: at least 4, so every replica fits)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the apps to be running")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from raybooth.serve_apps.deploy import (
        app_names,
        app_url,
        check_serve_config,
        deploy,
        load_serve_config,
        wait_http,
        wait_running,
        with_http,
    )

    config = load_serve_config(args.config)  # checks the file before Ray starts
    http = config.get("http_options") or {}
    config = with_http(config, args.host or http.get("host", "127.0.0.1"), args.port or http.get("port", 8000))
    check_serve_config(config, args.config)
    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port", field="--port")

    import ray
    from ray import serve

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        cpus = args.num_cpus or max(4, os.cpu_count() or 1)
        ray.init(num_cpus=cpus, include_dashboard=False)
    # After ray.init, which installs its own SIGTERM handler (a bare exit): Ctrl-C and SIGTERM
    # (a service manager, `kill`) both end in the clean shutdown below. SIGINT is set
    # explicitly because a shell starting us in the background would have it ignored.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        deploy(config)
        names = app_names(config)
        print(f"raybooth serve: deploying {', '.join(names)} from {args.config} ...", flush=True)
        wait_running(names, args.timeout)
        url = app_url(config)
        wait_http(url + "/healthz", 60)
        print(f"raybooth serve: ready at {url}  (playground: {url}/; API docs: {url}/docs; Ctrl-C stops)",
              flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("raybooth serve: shutting down ...", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave Ray processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        print("raybooth serve: stopped", flush=True)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
