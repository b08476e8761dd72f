"""Training throughput: `raybooth train` on one Ray Train worker against the same training
mathematics in a plain single process (benchmarks/train/plain_loop.py), with and without the VAE
latent cache.

    .venv/bin/python benchmarks/train/bench_train.py [--steps 60] [--repeats 2] [--resolution 64]

Steps/s are measured over the training loop only (from the first step to the host sync after the
last one) in both; Ray's start-up (ray.init, starting the worker, loading the model, caching,
checkpoint, tear-down) is reported separately. The Ray worker gets `--cpus` CPUs (Ray then sets
its torch threads to that) and the plain loop the same number of torch threads; the default, 1,
keeps the figures stable on a shared machine (more OpenMP threads than free cores make every
step wait for the slowest thread). Before
comparing, the benchmark checks that both computed the same losses. Each variant runs `--repeats`
times, interleaved, and the best run counts. Results: benchmarks/out/train/results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[2]


def base_config(out: Path, steps: int, resolution: int, cache: bool, name: str, cpus: int):
    from raybooth.platform.config import TrainConfig, with_overrides

    return with_overrides(TrainConfig(), {
        "model": "tiny",
        "subject.instance_data_dir": str(REPO / "examples" / "demo-subject"),
        "priors.enabled": True,
        "priors.class_data_dir": str(out / "class-images"),
        "priors.num_class_images": 4,
        "priors.steps": 2,
        "train.mode": "full",
        "train.train_text_encoder": True,
        "train.resolution": resolution,
        "train.batch_size": 1,
        "train.max_steps": steps,
        "train.learning_rate": 1e-4,
        "train.cache_latents": cache,
        "train.checkpoint_every": steps,
        "train.log_every": steps,
        "train.validation_prompts": [],
        "scaling.num_workers": 1,
        "scaling.resources_per_worker": {"CPU": float(cpus)},
        "run.storage_path": str(out / "runs"),
        "run.name": name,
        "tracking.enabled": False,
    })


def ray_run(config) -> dict:
    from raybooth.jobs.train.driver import run_training
    from raybooth.jobs.train.metrics import read_records, step_metrics

    t0 = time.perf_counter()
    summary = run_training(config, progress=False)
    wall = time.perf_counter() - t0
    run_dir = Path(summary.run_dir)
    records = read_records(run_dir)
    started = next(r for r in records if r.get("event") == "started")
    metrics = step_metrics(run_dir)
    last = metrics[max(metrics)]
    loop_s = last["time"] - started["time"]
    worker = json.loads((run_dir / "workers" / "rank-0.json").read_text())
    return {
        "steps_per_second": len(metrics) / loop_s,
        "train_s": loop_s,
        "worker_setup_s": started["time"] - worker["started"],
        "fit_overhead_s": summary.train_seconds - loop_s,
        "wall_s": wall,
        "losses": [metrics[s]["loss"] for s in sorted(metrics)],
        "torch_threads": worker["torch_threads"],
        "class_images": sorted(str(p) for p in Path(summary.class_images_dir).glob("*.png")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs (= torch threads) of the worker and the plain loop")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "train"))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import ray
    import torch

    from plain_loop import plain_train
    from raybooth.platform.images import list_images
    from raybooth.platform.tiny import tiny_model_path

    tiny_model_path("tiny")
    cpus = args.cpus
    t0 = time.perf_counter()
    ray.init(num_cpus=max(cpus, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    instance = list_images(REPO / "examples" / "demo-subject", "instance")

    runs: dict[str, list[dict]] = {"ray+cache": [], "plain+cache": [], "ray": [], "plain": []}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for rep in range(args.repeats):
        for cache in (True, False):
            suffix = "+cache" if cache else ""
            name = f"bench-{stamp}-{rep}{'-cache' if cache else ''}"
            config = base_config(out, args.steps, args.resolution, cache, name, cpus)
            r = ray_run(config)
            runs[f"ray{suffix}"].append(r)
            torch.set_num_threads(r["torch_threads"])
            p = plain_train(config, instance, [Path(x) for x in r["class_images"]])
            runs[f"plain{suffix}"].append(p)
            diff = max(abs(a - b) for a, b in zip(r["losses"], p["losses"]))
            r["max_loss_diff_vs_plain"] = p["max_loss_diff_vs_ray"] = diff
            print(f"[{rep}] cache={cache}: ray {r['steps_per_second']:.2f} steps/s, plain "
                  f"{p['steps_per_second']:.2f} steps/s, max |loss diff| {diff:.2e}", flush=True)

    best = {k: max(v, key=lambda x: x["steps_per_second"]) for k, v in runs.items()}
    result = {
        "steps": args.steps, "resolution": args.resolution, "batch": "1 instance + 1 class image",
        "model": "tiny (UNet + text encoder trained)", "cpus_per_worker": cpus, "ray_init_s": ray_init_s,
        "torch_threads": best["ray+cache"]["torch_threads"],
        "best": {k: {kk: vv for kk, vv in v.items() if kk not in ("losses", "class_images")} for k, v in best.items()},
        "ratio_cache": best["ray+cache"]["steps_per_second"] / best["plain+cache"]["steps_per_second"],
        "ratio_nocache": best["ray"]["steps_per_second"] / best["plain"]["steps_per_second"],
        "cache_speedup_ray": best["ray+cache"]["steps_per_second"] / best["ray"]["steps_per_second"],
        "cache_speedup_plain": best["plain+cache"]["steps_per_second"] / best["plain"]["steps_per_second"],
        "max_loss_diff": max(r["max_loss_diff_vs_plain"] for v in runs.values() for r in v if "max_loss_diff_vs_plain" in r),
    }
    b = best
    table = "\n".join([
        "| variant | steps/s | vs plain | losses equal to plain (max abs diff) |",
        "| --- | --- | --- | --- |",
        f"| plain loop, latents cached | {b['plain+cache']['steps_per_second']:.2f} | 1.00x | — |",
        f"| `raybooth train`, 1 Ray Train worker, latents cached | {b['ray+cache']['steps_per_second']:.2f} | "
        f"**{result['ratio_cache']:.2f}x** | {b['ray+cache']['max_loss_diff_vs_plain']:.1e} |",
        f"| plain loop, VAE encode every step | {b['plain']['steps_per_second']:.2f} | 1.00x | — |",
        f"| `raybooth train`, 1 worker, VAE encode every step | {b['ray']['steps_per_second']:.2f} | "
        f"**{result['ratio_nocache']:.2f}x** | {b['ray']['max_loss_diff_vs_plain']:.1e} |",
        "",
        f"Latent cache speed-up: {result['cache_speedup_ray']:.2f}x with Ray, {result['cache_speedup_plain']:.2f}x plain.",
        "",
        "| Ray start-up (not in steps/s) | seconds |",
        "| --- | --- |",
        f"| `ray.init()` (local) | {ray_init_s:.1f} |",
        f"| worker setup: import, load model, cache latents/embeddings | {b['ray+cache']['worker_setup_s']:.1f} |",
        f"| whole `fit()` minus the training loop (start workers, setup, checkpoint, tear-down) | {b['ray+cache']['fit_overhead_s']:.1f} |",
        f"| plain loop setup (load model, caches) | {b['plain+cache']['setup_s']:.1f} |",
    ])
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
