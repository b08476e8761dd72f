"""A worker's default CPU share when Ray declares more CPUs than the machine has cores.

Ray's CPUs are logical: `ray start --num-cpus 8`, `raybooth serve` (4 on a 2-core machine) and the
test suite (4) declare more than the cores. raybooth's default share used to split the declared
CPUs, so two workers on a 2-core machine each took 2 CPUs and ran 2 torch threads: 4 threads on
2 cores. The share now splits at most the machine's cores (`raybooth.platform.devices.free_cpus`).

This runs the same tiny 2-worker DreamBooth (64 px, batch 1, 30 steps) on a local Ray that
declares twice the machine's cores, with the default share and with the old one
(`scaling.resources_per_worker={CPU: declared / 2}`), interleaved, best of each kept.

    .venv/bin/python benchmarks/train/bench_cpu_share.py [--steps 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[2]


def _config(out: Path, steps: int, name: str, resources: dict | None):
    from raybooth.platform.config import TrainConfig, with_overrides

    values = {
        "model": "tiny",
        "subject.instance_data_dir": str(REPO / "examples" / "demo-subject"),
        "priors.enabled": False,
        "train.resolution": 64,
        "train.batch_size": 1,
        "train.max_steps": steps,
        "train.checkpoint_every": steps,
        "train.log_every": 1,
        "train.validation_prompts": [],
        "scaling.num_workers": 2,
        "run.storage_path": str(out),
        "run.name": name,
        "tracking.enabled": False,
    }
    if resources:
        values["scaling.resources_per_worker"] = resources
    return with_overrides(TrainConfig(), values)


def _run(out: Path, steps: int, name: str, resources: dict | None) -> dict:
    from raybooth.jobs.train.driver import run_training

    summary = run_training(_config(out, steps, name, resources), progress=False)
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    started = next(r["time"] for r in records if r.get("event") == "started")
    last = max((r for r in records if "loss" in r), key=lambda r: r["step"])
    worker = json.loads((summary.run_dir / "workers" / "rank-0.json").read_text())
    return {"steps_per_s": steps / (last["time"] - started), "threads": worker["torch_threads"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import ray

    from raybooth.platform.devices import machine_cores

    cores = machine_cores()
    declared = 2 * cores
    ray.init(num_cpus=declared, include_dashboard=False, log_to_driver=False)
    variants = {"default share": None, f"old share ({declared // 2} CPUs/worker)": {"CPU": declared // 2}}
    results: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for i, (label, resources) in enumerate(variants.items()):
                results[label].append(_run(Path(tmp), args.steps, f"r{round_}-{i}", resources))
                print(f"round {round_} {label}: {results[label][-1]}", flush=True)
    ray.shutdown()
    best = {k: max(r["steps_per_s"] for r in v) for k, v in results.items()}
    base = best["default share"]
    load = os.getloadavg()
    print(f"\n{cores} cores, Ray declares {declared} CPUs; 2 workers; {args.steps} steps; best of "
          f"{args.rounds}; load average {load[0]:.1f}")
    print("| variant | torch threads / worker | steps/s (rounds) | vs default |")
    print("| --- | ---: | --- | ---: |")
    for label, runs in results.items():
        rates = ", ".join(f"{r['steps_per_s']:.2f}" for r in runs)
        print(f"| {label} | {runs[0]['threads']} | {rates} | {best[label] / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
