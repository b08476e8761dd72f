"""`raybooth train` with its shipped defaults against the DreamBooth loop a user would write
without it (benchmarks/train/user_loop.py: diffusers-example style, torch's default threads).

Same model (tiny), subject, class images, batch (2 instance + 2 class images), resolution,
steps and machine; text encoder frozen on both sides (diffusers' README default). raybooth runs
as shipped: one Ray Train worker whose CPUs default to an equal share of the machine, latents and
prompt embeddings cached. Also: raybooth with latent caching off (prompt embeddings of a frozen
text encoder stay cached), and two workers (samples/s, since each step then trains twice the
samples). Steps/s counts the training loop only on both sides; start-up is reported apart.
Interleaved rounds, best of each kept.

    .venv/bin/python benchmarks/train/bench_vs_user_loop.py [--steps 60] [--rounds 2]
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
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parents[1]
BATCH = 2


def config_for(out: Path, steps: int, resolution: int, name: str, workers: int, cache: bool):
    from raybooth.platform.config import TrainConfig, with_overrides

    return with_overrides(TrainConfig(), {
        "model": "tiny",
        "subject.instance_data_dir": str(REPO / "examples" / "demo-subject"),
        "priors.enabled": True,
        "priors.class_data_dir": str(out / "class-images"),
        "priors.num_class_images": 4,
        "priors.steps": 2,
        "train.train_text_encoder": False,
        "train.resolution": resolution,
        "train.batch_size": BATCH,
        "train.max_steps": steps,
        "train.learning_rate": 1e-4,
        "train.cache_latents": cache,
        "train.checkpoint_every": steps,
        "train.log_every": steps,
        "train.validation_prompts": [],
        "scaling.num_workers": workers,
        "run.storage_path": str(out / "runs"),
        "run.name": name,
        "tracking.enabled": False,
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "train-vs-user"))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import ray

    from bench_train import ray_run
    from user_loop import user_train
    from raybooth.platform.images import list_images
    from raybooth.platform.tiny import tiny_model_path

    model_dir = str(tiny_model_path("tiny"))
    instance = list_images(REPO / "examples" / "demo-subject", "instance")
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)  # as a user's machine: its own CPUs
    ray_init_s = time.perf_counter() - t0

    runs: dict[str, list[dict]] = {"user": [], "raybooth": [], "raybooth-nocache": [], "raybooth-2w": []}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    classes: list[Path] = []
    for rnd in range(args.rounds):
        for key, workers, cache in (("raybooth", 1, True), ("raybooth-nocache", 1, False), ("raybooth-2w", 2, True)):
            r = ray_run(config_for(out, args.steps, args.resolution, f"{key}-{stamp}-{rnd}", workers, cache))
            r["samples_per_second"] = r["steps_per_second"] * 2 * BATCH * workers
            runs[key].append(r)
            classes = [Path(p) for p in r["class_images"]]
            print(f"[{rnd}] {key}: {r['steps_per_second']:.2f} steps/s ({r['torch_threads']} threads)", flush=True)
        u = user_train(model_dir, instance, classes, "a photo of sks robot toy", "a photo of a robot toy",
                       args.steps, BATCH, args.resolution)
        u["samples_per_second"] = u["steps_per_second"] * 2 * BATCH
        runs["user"].append(u)
        print(f"[{rnd}] user loop: {u['steps_per_second']:.2f} steps/s ({u['torch_threads']} threads)", flush=True)

    best = {k: max(v, key=lambda x: x["samples_per_second"]) for k, v in runs.items()}
    base = best["user"]["samples_per_second"]
    rows = [
        ("plain user loop (diffusers-example style, torch default threads, VAE + text encoder every step)", "user"),
        ("`raybooth train`, shipped defaults (1 worker, latents + prompts cached)", "raybooth"),
        ("`raybooth train`, 1 worker, latent caching off", "raybooth-nocache"),
        ("`raybooth train`, 2 workers", "raybooth-2w"),
    ]
    lines = ["| variant | torch threads / worker | steps/s | samples/s | vs user loop |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, key in rows:
        b = best[key]
        lines.append(f"| {label} | {b['torch_threads']} | {b['steps_per_second']:.2f} | "
                     f"{b['samples_per_second']:.1f} | **{b['samples_per_second'] / base:.2f}x** |")
    load = os.getloadavg()[0]
    lines += ["", f"tiny model, {args.resolution} px, batch {BATCH} instance + {BATCH} class images, text encoder "
              f"frozen, {args.steps} steps, best of {args.rounds} interleaved rounds; `ray.init` {ray_init_s:.1f} s and "
              f"fit() overhead {best['raybooth']['fit_overhead_s']:.1f} s not in steps/s; {os.cpu_count()} CPUs, "
              f"load average {load:.1f} at the end. Targets: shipped defaults >= 1.2x, caching off >= 0.95x."]
    result = {"best": {k: {kk: vv for kk, vv in v.items() if kk not in ("losses", "class_images")} for k, v in best.items()},
              "ratio_defaults": best["raybooth"]["samples_per_second"] / base,
              "ratio_nocache": best["raybooth-nocache"]["samples_per_second"] / base,
              "ratio_two_workers": best["raybooth-2w"]["samples_per_second"] / base,
              "ray_init_s": ray_init_s, "load_avg_end": load}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
