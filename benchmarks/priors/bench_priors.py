"""Class-image generation: images per second, a plain loop against the Ray actor pool.

Every mode makes the same images (same model, prompt, seeds, batch layout, 64 px, N steps) and
encodes them as PNG, so the work is identical; the script also checks which modes produced
byte-identical images (equal thread counts must).

Modes:
- plain loop: one process, one DiffusionRunner, `text_to_image` per block — what you would write
  without raybooth (with torch's default threads, and pinned to one thread);
- actor pool: `PriorPool` (what `raybooth priors` runs) with 1 actor x 1 CPU, 1 actor x 2 CPUs,
  2 actors x 1 CPU.

Generation is timed apart from start-up (process start + model load): with a real model the load
is paid once per actor while generation grows with the set, so the steady rate is what scales.
Each mode runs `--repeats` times and keeps its best generation time (the machine is shared).

    .venv/bin/python benchmarks/priors/bench_priors.py            # writes results.md / results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def spec_for(args: argparse.Namespace, threads: int):
    from raybooth.jobs.priors_spec import build_spec, resolve_inputs
    from raybooth.platform.config import load_config

    config = load_config(
        None,
        [
            f"priors.batch_size={args.batch_size}",
            f"priors.steps={args.steps}",
            f"priors.resolution={args.resolution}",
            f"priors.cpus_per_actor={threads}",
            "subject.class_prompt=a photo of a dog",
        ],
    )
    return build_spec(config, resolve_inputs(config), use_gpu=False)


def work_for(args: argparse.Namespace, spec) -> dict[int, list[int]]:
    work: dict[int, list[int]] = {}
    for i in range(args.images):
        work.setdefault(spec.block_of(i), []).append(i)
    return work


def fingerprint(results: dict[int, bytes]) -> str:
    h = hashlib.sha256()
    for i in sorted(results):
        h.update(results[i])
    return h.hexdigest()[:12]


def plain_loop(args: argparse.Namespace, threads: int | None) -> dict:
    """The baseline: no Ray, one runner, the same blocks and seeds."""
    import torch

    from raybooth.jobs.priors_actor import encode_png
    from raybooth.jobs.priors_spec import seed_for
    from raybooth.platform.pipelines import DiffusionRunner

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    spec = spec_for(args, threads or default_threads)
    t0 = time.perf_counter()
    runner = DiffusionRunner(spec.model_ref, device="cpu", dtype="fp32")
    startup = time.perf_counter() - t0
    best, results = float("inf"), {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        results = {}
        for block in work_for(args, spec):
            indices = spec.block_indices(block)
            images = runner.text_to_image(
                [spec.prompt] * len(indices), [seed_for(spec.seed, i) for i in indices], spec.params()
            )
            results.update({i: encode_png(img) for i, img in zip(indices, images) if i < args.images})
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(default_threads)
    name = f"plain loop, {threads or default_threads} thread(s)" + ("" if threads else " (torch default)")
    return {"mode": name, "actors": 0, "threads": threads or default_threads, "startup_s": startup,
            "generate_s": best, "images": args.images, "fingerprint": fingerprint(results)}


def actor_pool(args: argparse.Namespace, actors: int, cpus: int) -> dict:
    from raybooth.jobs.priors_actor import ActorPlan
    from raybooth.jobs.priors_pool import PriorPool
    from raybooth.platform.config import ModelOptions

    spec = spec_for(args, cpus)
    plan = ActorPlan(num_actors=actors, num_cpus=cpus, num_gpus=0.0, use_gpu=False)
    t0 = time.perf_counter()
    pool = PriorPool(spec, ModelOptions(), plan)
    try:
        pool.wait_ready()
        startup = time.perf_counter() - t0
        best, results = float("inf"), {}
        for _ in range(args.repeats):
            results = {}
            t0 = time.perf_counter()
            pool.run(work_for(args, spec), lambda batch: results.update(dict(batch)))
            best = min(best, time.perf_counter() - t0)
    finally:
        pool.shutdown()
    return {"mode": f"{actors} actor(s) x {cpus} CPU", "actors": actors, "threads": cpus,
            "startup_s": startup, "generate_s": best, "images": args.images,
            "fingerprint": fingerprint(results)}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    base = rows[0]["images"] / rows[0]["generate_s"]
    lines = [
        f"{args.images} images, tiny model, {args.resolution} px, {args.steps} steps, batch "
        f"{args.batch_size}, {os.cpu_count()} CPU cores; best of {args.repeats}.",
        "",
        "| mode | images/s (generation) | vs plain loop | start-up + load (s) | same bytes as |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        rate = row["images"] / row["generate_s"]
        twins = [r["mode"] for r in rows if r is not row and r["fingerprint"] == row["fingerprint"]]
        lines.append(
            f"| {row['mode']} | {rate:.2f} | {rate / base:.2f}x | {row['startup_s']:.1f} | "
            f"{', '.join(twins) or '—'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)

    import ray

    # Imports are paid once per process; the plain loop's start-up then counts the model load
    # only, while an actor's counts its process start, imports and load (what a user waits for).
    import diffusers.pipelines.stable_diffusion  # noqa: F401

    from raybooth.platform.tiny import tiny_model_path

    tiny_model_path("tiny")
    rows = [plain_loop(args, None), plain_loop(args, 1)]
    for row in rows:
        print(f"{row['mode']}: {row['images'] / row['generate_s']:.2f} images/s", flush=True)
    cores = os.cpu_count() or 2
    # Ray gets the real core count, so actors are placed as they would be on this machine.
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        for actors, cpus in [(1, 1), (1, min(2, cores)), (2, 1)]:
            row = actor_pool(args, actors, cpus)
            rows.append(row)
            print(f"{row['mode']}: {row['images'] / row['generate_s']:.2f} images/s", flush=True)
    finally:
        ray.shutdown()
    text = table(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
