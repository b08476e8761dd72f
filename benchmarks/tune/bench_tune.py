"""A sweep against the same trials run one after another with `raybooth train` (CPU, tiny model).

    .venv/bin/python benchmarks/tune/bench_tune.py [--trials 2] [--steps 4] [--out benchmarks/tune]

Both sides train the same configs (one worker of 1 CPU each, priors and tracking off, the sampled
learning rates of a grid): the sweep runs them through `raybooth tune` with
`max_concurrent_trials` = the number of trials and no scheduler; the baseline runs
`raybooth train --set train.learning_rate=...` for each, in turn. Measured in one run on the same
machine:

- wall time of each side (launch of the command to its exit), and the ratio;
- per-trial start overhead: from the trial function's start (`trial_starts.jsonl`) to the trial's
  first training step (`metrics.jsonl`), against the same for `raybooth train` (launch to the
  first step). The sweep's figure also excludes Ray's own start (paid once per sweep).

Writes results.md and results.json next to this file (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RAYBOOTH = [sys.executable, "-m", "raybooth.cli"]
LRS = [1e-4, 2e-4, 5e-4, 1e-3]


def first_step_time(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("step") == 1 and "time" in rec:
            return float(rec["time"])
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args()
    lrs = LRS[: args.trials]
    work = Path(tempfile.mkdtemp(prefix="raybooth-bench-tune-"))
    env = {**os.environ, "RAYBOOTH_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(work / "ray")}
    (work / "ray").mkdir()
    train = {
        "model": "tiny", "subject": {"instance_data_dir": str(REPO / "examples" / "demo-subject")},
        "priors": {"enabled": False},
        "train": {"resolution": 32, "max_steps": args.steps, "checkpoint_every": args.steps, "log_every": 1,
                  "validation_prompts": [], "train_text_encoder": False},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
        "run": {"storage_path": str(work / "runs"), "max_failures": 0},
        "tracking": {"enabled": False},
    }
    (work / "train.yaml").write_text(yaml.safe_dump(train))
    (work / "sweep.yaml").write_text(yaml.safe_dump({
        "base": str(work / "train.yaml"), "space": {"train.learning_rate": {"grid": lrs}},
        "search": {"algorithm": "grid"}, "scheduler": {"type": "none"},
        "max_concurrent_trials": len(lrs), "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
        "sweep": {"name": "bench"},
    }))
    load_before = os.getloadavg()

    # The sweep.
    t0 = time.time()
    subprocess.run(RAYBOOTH + ["tune", "--config", str(work / "sweep.yaml"), "--num-cpus", str(len(lrs) + 1)],
                   check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    sweep_s = time.time() - t0
    sweep = json.loads((work / "runs" / "sweeps" / "bench" / "sweep.json").read_text())
    sweep_overheads = []
    for t in sweep["trials"]:
        run_dir = Path(t["run_dir"])
        started = json.loads((run_dir / "trial_starts.jsonl").read_text().splitlines()[0])["time"]
        first = first_step_time(run_dir)
        if first is not None:
            sweep_overheads.append(first - started)

    # The same trials, one after another.
    serial_s, serial_overheads = 0.0, []
    for i, lr in enumerate(lrs):
        name = f"serial-{i}"
        t0 = time.time()
        subprocess.run(RAYBOOTH + ["train", "--config", str(work / "train.yaml"), "--no-progress",
                                   "--set", f"train.learning_rate={lr}", "--set", f"run.name={name}"],
                       check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        serial_s += time.time() - t0
        first = first_step_time(work / "runs" / name)
        if first is not None:
            serial_overheads.append(first - t0)

    result = {
        "trials": len(lrs), "steps": args.steps, "sweep_wall_s": round(sweep_s, 1),
        "serial_wall_s": round(serial_s, 1), "speedup": round(serial_s / sweep_s, 2),
        "sweep_trial_start_s": round(statistics.median(sweep_overheads), 1) if sweep_overheads else None,
        "train_start_s": round(statistics.median(serial_overheads), 1) if serial_overheads else None,
        "load_before": [round(x, 1) for x in load_before], "load_after": [round(x, 1) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(
        "# `raybooth tune` against the same trials run one after another\n\n"
        f"{result['trials']} trials of {result['steps']} steps (tiny model, 1 worker x 1 CPU each), "
        f"{result['cpus']} CPUs, load average {result['load_before']} -> {result['load_after']}.\n\n"
        "| | wall (s) | start of a trial to its first step (s, median) |\n|---|---|---|\n"
        f"| `raybooth tune` ({result['trials']} at a time) | {result['sweep_wall_s']} | {result['sweep_trial_start_s']} |\n"
        f"| `raybooth train` x {result['trials']}, in turn | {result['serial_wall_s']} | {result['train_start_s']} (launch to first step) |\n\n"
        f"Sweep speed-up: **{result['speedup']}x**. Produced by `benchmarks/tune/bench_tune.py`.\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
