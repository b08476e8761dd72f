"""`make bench`: every CPU benchmark in turn (tiny model), each writing its own results table.

Run on an otherwise idle machine: the figures are ratios from one run, and other load skews them.
The GPU benchmark (benchmarks/gpu/) is run separately on a GPU machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    HERE / "priors" / "bench_priors.py",
    HERE / "train" / "bench_train.py",
    HERE / "train" / "bench_vs_user_loop.py",
    HERE / "serve" / "bench_serve.py",
    HERE / "serve" / "bench_vs_plain.py",
    HERE / "evaluate" / "bench_evaluate.py",
    HERE / "tune" / "bench_tune.py",
    HERE / "startup" / "bench_startup.py",
]


def main() -> int:
    failed = []
    for script in BENCHMARKS:
        print(f"== {script.relative_to(HERE.parent)}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, str(script)])
        print(f"== {script.name}: exit {code} in {time.perf_counter() - t0:.0f} s", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
