"""Serving against the server a user would write without raybooth, on the same machine.

- plain: `benchmarks/serve/plain_server.py` — FastAPI + uvicorn, one diffusers pipeline, one call
  per request, torch's default threads (the baseline of issue "speed": what a user would run);
- raybooth: `raybooth serve --config configs/serve/local.yaml` exactly as shipped (its replicas,
  threads, batching and autoscaling), reached over HTTP at /v1/images/generations.

Both serve the same tiny model at 64 px with the same steps and guidance; the load is N requests
of one image each from C closed-loop clients (default 48 at concurrency 8). Servers run one at a
time, in alternating rounds, each round started fresh and warmed up off the clock; each side
keeps its best round, so load from other processes hits both alike. Also reports how long
`raybooth serve` takes from launch until /healthz answers.

    .venv/bin/python benchmarks/serve/bench_vs_plain.py            # writes results-vs-plain.{md,json}
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    import requests

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def drive(post, total: int, concurrency: int) -> dict:
    """`total` one-image requests from `concurrency` closed-loop clients; images/s and latency."""
    lock = threading.Lock()
    state = {"next": 0}
    latencies: list[float] = []

    def client() -> None:
        while True:
            with lock:
                if state["next"] >= total:
                    return
                state["next"] += 1
                i = state["next"]
            t0 = time.perf_counter()
            post(i)
            with lock:
                latencies.append(time.perf_counter() - t0)

    with cf.ThreadPoolExecutor(concurrency) as pool:  # warm-up, off the clock
        list(pool.map(post, range(100_000, 100_000 + concurrency)))
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        for fut in [pool.submit(client) for _ in range(concurrency)]:
            fut.result()
    wall = time.perf_counter() - started
    latencies.sort()
    return {"images": len(latencies), "seconds": round(wall, 2), "images_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(latencies[len(latencies) // 2], 3), "p99_s": round(latencies[-1], 3)}


def run_plain(args, model_dir: str) -> dict:
    import requests

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "plain_server.py"), "--model-dir", model_dir,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        start_s = wait_healthy(url, proc, 120)
        session = requests.Session()

        def post(i: int) -> None:
            r = session.post(url + "/generate", timeout=300,
                             json={"prompt": f"a toy number {i}", "seed": i, "steps": args.steps})
            r.raise_for_status()

        return {**drive(post, args.requests, args.concurrency), "start_s": round(start_s, 1)}
    finally:
        proc.terminate()
        proc.wait(30)


def run_raybooth(args) -> dict:
    import requests

    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAYBOOTH_API_KEYS": ""}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "raybooth.cli", "serve", "--config", args.config,
                             "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 300)
        start_s = time.perf_counter() - t0
        session = requests.Session()

        def post(i: int) -> None:
            r = session.post(url + "/v1/images/generations", timeout=300,
                             json={"prompt": f"a toy number {i}", "seed": i, "steps": args.steps, "n": 1})
            r.raise_for_status()

        return {**drive(post, args.requests, args.concurrency), "start_s": round(start_s, 1)}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/serve/local.yaml")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)

    from raybooth.platform.tiny import tiny_model_path

    model_dir = str(tiny_model_path("tiny"))
    plain, ours = [], []
    for _ in range(args.rounds):
        plain.append(run_plain(args, model_dir))
        print("plain   ", plain[-1], flush=True)
        ours.append(run_raybooth(args))
        print("raybooth", ours[-1], flush=True)
    best_plain = max(plain, key=lambda r: r["images_per_s"])
    best_ours = max(ours, key=lambda r: r["images_per_s"])
    ratio = best_ours["images_per_s"] / best_plain["images_per_s"]
    load = os.getloadavg()[0]
    import torch

    result = {"config": args.config, "requests": args.requests, "concurrency": args.concurrency,
              "steps": args.steps, "plain": plain, "raybooth": ours, "ratio": round(ratio, 3),
              "cpus": os.cpu_count(), "torch": torch.__version__, "load_avg_end": round(load, 2),
              "python": platform.python_version()}
    md = "\n".join([
        f"| server | images/s (best of {args.rounds}) | p50 s | p99 s | start until healthy s |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| plain FastAPI + uvicorn, torch default threads | {best_plain['images_per_s']:.2f} | "
        f"{best_plain['p50_s']} | {best_plain['p99_s']} | {best_plain['start_s']} |",
        f"| `raybooth serve --config {args.config}` | {best_ours['images_per_s']:.2f} | {best_ours['p50_s']} | "
        f"{best_ours['p99_s']} | {best_ours['start_s']} |",
        "",
        f"- raybooth / plain: **{ratio:.2f}x** (target >= 1.2)",
        f"- tiny model, 64 px, {args.steps} steps, guidance 7.5, DDIM; {args.requests} one-image requests from "
        f"{args.concurrency} closed-loop clients; servers one at a time in {args.rounds} alternating rounds, "
        f"warm-up off the clock; machine: {os.cpu_count()} CPUs, load average {load:.1f} at the end, torch {torch.__version__}",
    ])
    out = Path(args.out)
    stem = "results-vs-plain" if args.config.endswith("local.yaml") else f"results-vs-plain-{Path(args.config).stem}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
