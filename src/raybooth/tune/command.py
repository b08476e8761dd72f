"""`raybooth tune --config configs/tune/tiny.yaml [--set KEY=VALUE ...] [--resume]`

The last line printed is the path of sweep.json (what scripts and tests read).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from raybooth.platform.config import add_config_arguments


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tune",
        help="Ray Tune sweep over DreamBooth training (ASHA, MLflow parent/child runs, best model registered)",
        description="Sample training configs from a sweep file's space, train each as a Ray Tune "
        "trial (the TorchTrainer of `raybooth train`), stop weak trials early (ASHA), record a "
        "parent MLflow run with one nested run per trial, register the best model under "
        "tracking.alias and write sweep.json in <storage>/<sweep.name>/. Ray starts with its "
        "dashboard (Tune frees stopped trials' resources through the State API).",
    )
    add_config_arguments(p, "a sweep config (configs/tune/*.yaml); --set overrides its base training config",
                         "train.max_steps=100", required=True)
    p.add_argument("--resume", action="store_true",
                   help="continue a sweep that stopped (finished trials are not run again)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray this command starts (default: the machine's)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from raybooth.tune.config import load_sweep
    from raybooth.tune.sweep import SWEEP_FILE, run_sweep

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    loaded = load_sweep(args.config, args.overrides)  # every check before Ray starts
    result = run_sweep(loaded, resume=args.resume, num_cpus=args.num_cpus)
    for t in result.trials:
        obj = "n/a" if t.final_objective is None else format(t.final_objective, ".5g")
        print(f"  {t.trial_id}  {t.status:9s} {t.iterations:3d} report(s)  objective {obj}  {t.config}")
    best = result.best
    if best is not None:
        print(f"best: {best.trial_id} objective {best.final_objective:.5g} {best.config}")
    if result.model_uri:
        print(f"registered: {result.model_uri} (version {result.registered_version})")
    if result.plot:
        print(f"plot: {result.plot}")
    print(result.sweep_dir / SWEEP_FILE)
    return 0
