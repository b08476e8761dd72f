"""Serving: images/s and p50/p99 latency of the HTTP endpoint against the same pipeline called
in-process, and with batching on against batching off.

- in-process: one `DiffusionRunner` in this process, `text_to_image` with batches of 1, 4 and 8
  distinct prompts/seeds (the batch the endpoint forms at concurrency 1, 4 and >= 8);
- endpoint, batching on: the Serve app (proxy -> ingress -> TextToImage replica) with
  `max_batch_size: 8`, driven by C closed-loop HTTP clients (C = 1, 4, 8, 16), one image per
  request;
- endpoint, batching off: the same app after a `user_config` change to `max_batch_size: 1`
  (applied to the running replica, no restart).

The replica and the in-process runner use the same torch thread count, model (tiny), size (64 px),
steps and guidance, so the pipeline work per image is identical; what differs is HTTP, the
ingress, Ray's handles and batching. Each cell is bounded by a request count and a time limit.
Modes run in interleaved rounds (`--repeats`) and each cell keeps its best round, so load from
other processes on a shared machine hits every mode alike.

    .venv/bin/python benchmarks/serve/bench_serve.py     # writes results.md / results.json here
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONCURRENCY = (1, 4, 8, 16)
MAX_BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summarize(images: int, wall: float, latencies: list[float]) -> dict:
    return {"images": images, "seconds": round(wall, 3), "images_per_s": round(images / wall, 3),
            "p50_s": round(percentile(latencies, 50), 3), "p99_s": round(percentile(latencies, 99), 3)}


# ------------------------------------------------------------------------------ in-process


def bench_in_process(runner, batch: int, args) -> dict:
    from raybooth.platform.generation import GenerationParams

    params = GenerationParams(steps=args.steps, guidance_scale=7.5, scheduler="ddim")
    runner.text_to_image(["warm-up"] * batch, list(range(batch)), params)
    calls = max(2, args.images // batch)
    latencies, done = [], 0
    started = time.perf_counter()
    for call in range(calls):
        seeds = [1000 + call * batch + k for k in range(batch)]
        t0 = time.perf_counter()
        runner.text_to_image([f"a toy number {s}" for s in seeds], seeds, params)
        latencies += [time.perf_counter() - t0] * batch  # every image of a call is ready at its end
        done += batch
        if time.perf_counter() - started > args.cell_seconds:
            break
    return summarize(done, time.perf_counter() - started, latencies)


# ------------------------------------------------------------------------------ endpoint


def bench_endpoint(url: str, concurrency: int, args) -> dict:
    import requests

    total = max(args.images, 4 * concurrency)  # several rounds per client: start and tail matter less
    lock = threading.Lock()
    state = {"next": 0}
    latencies: list[float] = []
    batch_sizes: list[int] = []

    def take() -> int | None:
        with lock:
            if state["next"] >= total or time.perf_counter() - started > args.cell_seconds:
                return None
            state["next"] += 1
            return state["next"]

    def client() -> None:
        session = requests.Session()
        while (i := take()) is not None:
            t0 = time.perf_counter()
            resp = session.post(url + "/v1/images/generations", timeout=300, json={
                "prompt": f"a toy number {i}", "seed": 1000 + i, "steps": args.steps, "guidance_scale": 7.5})
            resp.raise_for_status()
            with lock:
                latencies.append(time.perf_counter() - t0)
                batch_sizes.append(resp.json()["batch_size"])

    # Warm-up outside the clock: connections, routers, the first batches.
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: requests.post(url + "/v1/images/generations", timeout=300, json={
            "prompt": "warm-up", "seed": i, "steps": args.steps}).raise_for_status(), range(concurrency)))
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        for fut in [pool.submit(client) for _ in range(concurrency)]:
            fut.result()
    result = summarize(len(latencies), time.perf_counter() - started, latencies)
    result["mean_batch_size"] = round(statistics.mean(batch_sizes), 2)
    return result


def serve_config(port: int, threads: int, max_batch_size: int, batch_wait_s: float) -> dict:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "raybooth", "route_prefix": "/", "import_path": "raybooth.serve_apps.app:build_app",
            "args": {"text_to_image": [{"name": "tiny", "model": "tiny", "torch_threads": threads, "warmup_steps": 2}],
                     "inpainting": [], "auth": {"api_keys_env": "RAYBOOTH_BENCH_NO_KEYS"},
                     "limits": {"max_images": 4}},
            "deployments": [
                {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1}},
                {"name": "TextToImage", "num_replicas": 1, "max_ongoing_requests": 32, "max_queued_requests": -1,
                 "ray_actor_options": {"num_cpus": threads},
                 "user_config": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_s}},
            ],
        }],
    }


# ------------------------------------------------------------------------------ report


def table(results: dict, args) -> str:
    rows = ["| concurrency | batch | in-process img/s (p50 / p99 s) | endpoint, batching on img/s (p50 / p99 s, mean batch) "
            "| endpoint, batching off img/s (p50 / p99 s) | endpoint / in-process |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in CONCURRENCY:
        b = min(c, MAX_BATCH)
        ip, on, off = results["in_process"][str(b)], results["batching_on"][str(c)], results["batching_off"][str(c)]
        rows.append(
            f"| {c} | {b} | {ip['images_per_s']:.2f} ({ip['p50_s']:.2f} / {ip['p99_s']:.2f}) "
            f"| {on['images_per_s']:.2f} ({on['p50_s']:.2f} / {on['p99_s']:.2f}, {on['mean_batch_size']:.1f}) "
            f"| {off['images_per_s']:.2f} ({off['p50_s']:.2f} / {off['p99_s']:.2f}) "
            f"| {on['images_per_s'] / ip['images_per_s']:.2f}x |"
        )
    s = results["summary"]
    rows += [
        "",
        f"- endpoint at saturation (concurrency 16) / in-process batch 8: **{s['endpoint_vs_in_process']:.2f}x** (target >= 0.9)",
        f"- batching gain of the endpoint (on / off, concurrency 16): **{s['endpoint_batching_gain']:.2f}x**; "
        f"the pipeline's own gain (batch 8 / batch 1, in-process): {s['pipeline_batching_gain']:.2f}x; "
        f"endpoint gain / pipeline gain: **{s['gain_ratio']:.2f}** (target >= 0.8); share of the speed-up "
        f"above 1x kept: {s['excess_share']:.2f}",
        f"- tiny model, 64 px, {args.steps} steps, guidance 7.5, DDIM, {args.threads} torch threads in both, "
        f"batch_wait_timeout_s {args.batch_wait}; "
        f"best of {args.repeats} interleaved rounds; machine: {results['machine']}",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, in-process and in the replica (on a loaded 2-core machine, "
                        "2 threads wait on each other far more than they gain)")
    parser.add_argument("--batch-wait", type=float, default=0.1, help="batch_wait_timeout_s of the endpoint")
    parser.add_argument("--images", type=int, default=48, help="images per cell (at most)")
    parser.add_argument("--cell-seconds", type=float, default=60, help="time limit per cell")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch
    from ray import serve

    from raybooth.platform.pipelines import DiffusionRunner
    from raybooth.platform.tiny import tiny_model_path
    from raybooth.serve_apps.deploy import app_url, deploy, wait_http, wait_running

    tiny_model_path("tiny")
    torch.set_num_threads(args.threads)
    runner = DiffusionRunner("tiny")
    ray.init(num_cpus=max(4, args.threads + 1), include_dashboard=False, log_to_driver=False)
    port = free_port()
    best: dict[str, dict[str, dict]] = {"in_process": {}, "batching_on": {}, "batching_off": {}}

    def keep(mode: str, key: str, result: dict) -> None:
        if key not in best[mode] or result["images_per_s"] > best[mode][key]["images_per_s"]:
            best[mode][key] = result
        print(f"  {mode:13s} {key:>3s}: {result}", flush=True)

    def deploy_with(max_batch_size: int) -> str:
        config = serve_config(port, args.threads, max_batch_size, args.batch_wait)
        deploy(config)
        wait_running(["raybooth"], 600)
        url = app_url(config)
        wait_http(url + "/healthz", 60)
        return url

    try:
        for round_ in range(args.repeats):
            print(f"round {round_ + 1}/{args.repeats}", flush=True)
            for batch in sorted({min(c, MAX_BATCH) for c in CONCURRENCY}):
                keep("in_process", str(batch), bench_in_process(runner, batch, args))
            for mode, max_batch in (("batching_on", MAX_BATCH), ("batching_off", 1)):
                url = deploy_with(max_batch)  # a user_config change: the same replica, reconfigured
                for c in CONCURRENCY:
                    keep(mode, str(c), bench_endpoint(url, c, args))
    finally:
        serve.shutdown()
        ray.shutdown()

    ip, on, off = best["in_process"], best["batching_on"], best["batching_off"]
    pipeline_gain = ip[str(MAX_BATCH)]["images_per_s"] / ip["1"]["images_per_s"]
    endpoint_gain = on["16"]["images_per_s"] / off["16"]["images_per_s"]
    results = {
        **best,
        "summary": {
            "endpoint_vs_in_process": on["16"]["images_per_s"] / ip[str(MAX_BATCH)]["images_per_s"],
            "pipeline_batching_gain": pipeline_gain,
            "endpoint_batching_gain": endpoint_gain,
            "gain_ratio": endpoint_gain / pipeline_gain,
            # Stricter: the share of the pipeline's speed-up *above 1x* that the endpoint keeps.
            "excess_share": (endpoint_gain - 1) / (pipeline_gain - 1) if pipeline_gain > 1 else float("nan"),
        },
        "settings": vars(args),
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = table(results, args)
    (out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
