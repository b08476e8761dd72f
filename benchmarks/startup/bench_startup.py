"""Start-up costs: what a user waits for before the first training step or the first answer.

Each measurement runs in a fresh subprocess; a row is the median of `--runs` runs (default 3).
With a "before" revision (default a7f3a9f, the last commit before the start-up work), every row is
measured on both code trees, interleaved (before, after, before, after, ...) so that the load of a
shared machine falls on both alike. Rows that do not depend on raybooth's code (`ray.init`, the
torch + diffusers import) are measured once per round.

    .venv/bin/python benchmarks/startup/bench_startup.py                # after = this checkout
    .venv/bin/python benchmarks/startup/bench_startup.py --after-rev HEAD --runs 3
    .venv/bin/python benchmarks/startup/bench_startup.py --no-before --only cli_help,serve_healthy

Rows (seconds):
  cli_help            `raybooth --help`, console script, wall time
  generate_help       `raybooth generate --help`, wall time
  ray_init_dashboard  `ray.init(num_cpus=2)` (the dashboard starts: ray[default] is installed)
  ray_init_nodash     `ray.init(num_cpus=2, include_dashboard=False)`
  import_torch_diffusers  `import torch` + `from diffusers import StableDiffusionPipeline`
  model_load_tiny     `DiffusionRunner("tiny").load_s` (the pipeline load, imports excluded)
  model_ready_tiny    wall time of a process that imports DiffusionRunner and loads "tiny"
  train_first_step    `run_training(config)` launched -> rank 0's step 1 recorded (metrics.jsonl)
  train_fit_overhead  `fit()` time minus the two steps' own time (worker start, model load,
                      checkpoint, teardown)
  serve_healthy       `raybooth serve --config configs/serve/local.yaml` launched -> /healthz 200

Each row has a budget (seconds) for a loaded 2-core machine; the script exits 1 and names every
row over budget (the "after" column is the one checked). Results: results.md and results.json here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BEFORE_REV = "a7f3a9f"
RAYBOOTH = Path(sys.executable).parent / "raybooth"  # the console script of this venv

# Budgets (seconds): the worst "after" median measured on the shared 2-core development machine
# (load average 12-45 from other jobs) with about 1.5x margin. On a quiet machine every row is
# several times below its budget; a row over it means a real regression (an import at module
# level, a second Ray start, a replica that stopped loading once).
BUDGETS = {
    "cli_help": 2.0,
    "generate_help": 2.0,
    "ray_init_dashboard": 45.0,
    "ray_init_nodash": 40.0,
    "import_torch_diffusers": 45.0,
    "model_load_tiny": 5.0,
    "model_ready_tiny": 60.0,
    "train_first_step": 300.0,
    "train_fit_overhead": 270.0,
    "serve_healthy": 240.0,
}

TITLES = {
    "cli_help": "`raybooth --help`",
    "generate_help": "`raybooth generate --help`",
    "ray_init_dashboard": "`ray.init(num_cpus=2)` (dashboard on; `raybooth train`, `priors`, `evaluate`)",
    "ray_init_nodash": "`ray.init(num_cpus=2, include_dashboard=False)` (`raybooth serve`)",
    "import_torch_diffusers": "import torch + diffusers pipelines",
    "model_load_tiny": "`DiffusionRunner(\"tiny\")` load (`load_s`)",
    "model_ready_tiny": "process start -> `DiffusionRunner(\"tiny\")` ready (imports + load)",
    "train_first_step": "`run_training` (1 worker, tiny) launched -> first training step",
    "train_fit_overhead": "`TorchTrainer.fit()` minus its 2 steps",
    "serve_healthy": "`raybooth serve` (local.yaml) launched -> `/healthz` 200",
}

# Rows whose code is Ray's or torch's, not raybooth's: one measurement per round, both columns.
SHARED = {"ray_init_dashboard", "ray_init_nodash", "import_torch_diffusers"}
ORDER = list(BUDGETS)
# What a failed measurement raises: a non-zero exit, a hang, a missing or short record.
MEASURE_ERRORS = (RuntimeError, OSError, subprocess.SubprocessError, KeyError, StopIteration, ValueError)


# ---------------------------------------------------------------------------------------------
# Code trees


class Tree:
    """A raybooth source tree: PYTHONPATH=<root>/src, configs from <root>/configs."""

    def __init__(self, label: str, root: Path, rev: str, layout: str):
        self.label, self.root, self.rev, self.layout = label, root, rev, layout

    @property
    def src(self) -> Path:
        return self.root / "src"

    def env(self, ray_tmp: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env["PYTHONPATH"] = str(self.src)
        # A private Ray temp dir: never join a `ray start` cluster someone else runs on this host.
        env["RAY_TMPDIR"] = str(ray_tmp)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env


def extract(rev: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src", "configs"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def short_rev(rev: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev],
                          check=True, capture_output=True, text=True).stdout.strip()


def tree_layout(root: Path) -> str:
    return "package" if (root / "src/raybooth/jobs/train/driver.py").is_file() else "flat"


# ---------------------------------------------------------------------------------------------
# Measurements (each in a fresh subprocess)


def _python(code: str, tree: Tree, ray_tmp: Path, cwd: Path, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=tree.env(ray_tmp), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def m_cli(tree: Tree, ray_tmp: Path, work: Path, argv: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([str(RAYBOOTH), *argv], env=tree.env(ray_tmp), cwd=work,
                          capture_output=True, text=True, timeout=120, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return {"wall": wall}


def m_ray_init(tree: Tree, ray_tmp: Path, work: Path, dashboard: bool) -> dict:
    extra = "" if dashboard else ", include_dashboard=False"
    return _python(f"""
        import json, time
        import ray
        t0 = time.perf_counter()
        ray.init(num_cpus=2{extra}, log_to_driver=False)
        init_s = time.perf_counter() - t0
        ray.shutdown()
        print("RESULT " + json.dumps({{"init": init_s}}))
    """, tree, ray_tmp, work)


def m_import_torch_diffusers(tree: Tree, ray_tmp: Path, work: Path) -> dict:
    return _python("""
        import json, time
        t0 = time.perf_counter()
        import torch
        t1 = time.perf_counter()
        from diffusers import StableDiffusionPipeline
        t2 = time.perf_counter()
        print("RESULT " + json.dumps({"torch": t1 - t0, "diffusers": t2 - t1, "both": t2 - t0}))
    """, tree, ray_tmp, work)


def m_model(tree: Tree, ray_tmp: Path, work: Path) -> dict:
    launched = time.perf_counter()
    out = _python("""
        import json, time
        t0 = time.perf_counter()
        from raybooth.platform.pipelines import DiffusionRunner
        t1 = time.perf_counter()
        runner = DiffusionRunner("tiny")
        t2 = time.perf_counter()
        print("RESULT " + json.dumps({"import": t1 - t0, "load_s": runner.load_s, "construct": t2 - t1}))
    """, tree, ray_tmp, work)
    out["ready"] = time.perf_counter() - launched
    return out


TRAIN_DRIVER = """
import json, sys, time
from raybooth.platform.config import load_config
if {package!r}:
    from raybooth.jobs.train.driver import run_training
else:
    from raybooth.jobs.train import run_training
config = load_config({config!r}, {overrides!r})
summary = run_training(config, progress=False)
if not isinstance(summary, dict):
    summary = {{"train_seconds": summary.train_seconds, "total_seconds": summary.total_seconds}}
print("RESULT " + json.dumps({{k: summary.get(k) for k in ("train_seconds", "total_seconds")}}))
"""


def m_train(tree: Tree, ray_tmp: Path, work: Path) -> dict:
    storage = work / f"runs-{tree.label}"
    name = f"startup-{int(time.time() * 1000)}"
    overrides = [
        f"subject.instance_data_dir={REPO / 'examples/demo-subject'}",
        "priors.enabled=false", "tracking.enabled=false", "scaling.num_workers=1",
        "train.max_steps=2", "train.log_every=1", "train.validation_prompts=[]",
        "train.checkpoint_every=2", f"run.storage_path={storage}", f"run.name={name}",
    ]
    code = TRAIN_DRIVER.format(package=tree.layout == "package",
                               config=str(tree.root / "configs/train/tiny.yaml"), overrides=overrides)
    launched = time.time()
    t0 = time.perf_counter()
    out = _python(code, tree, ray_tmp, work, timeout=900)
    wall = time.perf_counter() - t0
    run_dir = storage / name
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    started = next(r["time"] for r in records if r.get("event") == "started")
    steps = {r["step"]: r["time"] for r in records if "event" not in r and "step" in r}
    worker = json.loads((run_dir / "workers" / "rank-0.json").read_text())
    steps_s = steps[max(steps)] - started
    shutil.rmtree(storage, ignore_errors=True)
    return {
        "wall": wall,
        "worker_started": worker["started"] - launched,  # the rank-0 process entered the loop
        "loop_ready": started - launched,                # models loaded, latents cached, prepared
        "first_step": steps[1] - launched,
        "fit": out["train_seconds"],
        "steps": steps_s,
        "fit_overhead": out["train_seconds"] - steps_s,
        "total": out["total_seconds"],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def m_serve(tree: Tree, ray_tmp: Path, work: Path, timeout: float = 400) -> dict:
    port = _free_port()
    log_path = work / f"serve-{tree.label}-{port}.log"
    healthy = None
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(RAYBOOTH), "serve", "--config", str(tree.root / "configs/serve/local.yaml"),
             "--host", "127.0.0.1", "--port", str(port)],
            env=tree.env(ray_tmp), cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            while time.perf_counter() - t0 < timeout and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                        if resp.status == 200:
                            healthy = time.perf_counter() - t0
                            break
                except OSError:
                    pass
                time.sleep(0.2)
        finally:
            # Ctrl-C to the whole process group, as a terminal would; then the hard way.
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
    if healthy is None:
        raise RuntimeError(f"serve never healthy (exit {proc.returncode}); see {log_path}:\n"
                           + log_path.read_text()[-3000:])
    return {"healthy": healthy}


# row -> (measure, key in its result)
def plan(row: str):
    return {
        "cli_help": (lambda t, r, w: m_cli(t, r, w, ["--help"]), "wall"),
        "generate_help": (lambda t, r, w: m_cli(t, r, w, ["generate", "--help"]), "wall"),
        "ray_init_dashboard": (lambda t, r, w: m_ray_init(t, r, w, True), "init"),
        "ray_init_nodash": (lambda t, r, w: m_ray_init(t, r, w, False), "init"),
        "import_torch_diffusers": (m_import_torch_diffusers, "both"),
        "model_load_tiny": (m_model, "load_s"),
        "model_ready_tiny": (m_model, "ready"),
        "train_first_step": (m_train, "first_step"),
        "train_fit_overhead": (m_train, "fit_overhead"),
        "serve_healthy": (m_serve, "healthy"),
    }[row]


# ---------------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--before-rev", default=BEFORE_REV)
    ap.add_argument("--no-before", action="store_true", help="measure this checkout only")
    ap.add_argument("--after-rev", default=None,
                    help="measure a commit (extracted with git archive) instead of this checkout's src/")
    ap.add_argument("--only", default=None, help="comma-separated rows")
    ap.add_argument("--out", default=str(HERE), help="folder for results.md / results.json")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="re-check a results.json against the budgets above and rewrite results.md")
    args = ap.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        report.setdefault("rows", ORDER)
        report = with_budgets(report)
        write_report(report, Path(args.out))
        print(render(report))
        return 1 if report["over_budget"] else 0

    rows = [r for r in ORDER if not args.only or r in args.only.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="rbsu-", dir="/tmp"))  # short: Ray's socket paths
    ray_tmp = scratch / "r"
    ray_tmp.mkdir()
    work = scratch / "w"
    work.mkdir()

    if args.after_rev:
        after = Tree("after", extract(args.after_rev, scratch / "after"), short_rev(args.after_rev), "")
    else:
        # A snapshot of this checkout's src/ and configs/, so that edits made while the benchmark
        # runs do not mix into it.
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src", "configs"],
                               capture_output=True, text=True, check=False).stdout.strip()
        for part in ("src", "configs"):
            shutil.copytree(REPO / part, scratch / "after" / part,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        after = Tree("after", scratch / "after", short_rev("HEAD") + ("+worktree" if dirty else ""), "")
    after.layout = tree_layout(after.root)
    trees = [after]
    if not args.no_before:
        before = Tree("before", extract(args.before_rev, scratch / "before"), short_rev(args.before_rev), "")
        before.layout = tree_layout(before.root)
        trees = [before, after]

    # Measurements that give several rows at once share one run.
    groups: list[tuple[str, list[str]]] = []
    for row in rows:
        fn_name = {"model_load_tiny": "model", "model_ready_tiny": "model",
                   "train_first_step": "train", "train_fit_overhead": "train"}.get(row, row)
        for g, members in groups:
            if g == fn_name:
                members.append(row)
                break
        else:
            groups.append((fn_name, [row]))

    failures: list[str] = []
    samples: dict[str, dict[str, list[float]]] = {t.label: {r: [] for r in rows} for t in trees}
    details: dict[str, dict[str, list[dict]]] = {t.label: {} for t in trees}
    loads = [loadavg()]
    print(f"start-up benchmark: {args.runs} run(s), trees "
          + ", ".join(f"{t.label}={t.rev}" for t in trees) + f", load {loads[0]}", flush=True)
    started = time.time()
    try:
        # Untimed warm-up: the tiny models are built once into the cache, page cache is warm.
        for tree in trees:
            if any(r.startswith(("model_", "train_", "serve_")) for r in rows):
                try:
                    m_model(tree, ray_tmp, work)
                except MEASURE_ERRORS as exc:
                    print(f"  warm-up {tree.label} failed: {str(exc)[-300:]}", flush=True)
        for k in range(args.runs):
            for group, members in groups:
                shared = group in SHARED
                for tree in (trees[-1:] if shared else trees):
                    fn, _ = plan(members[0])
                    try:
                        result = fn(tree, ray_tmp, work)
                    except MEASURE_ERRORS as exc:  # one failed run must not lose the others
                        print(f"  run {k + 1}/{args.runs} {tree.label:6} {group} FAILED: {exc}", flush=True)
                        failures.append(f"{tree.label} {group}: {str(exc)[-500:]}")
                        continue
                    details[tree.label].setdefault(group, []).append(result)
                    for row in members:
                        value = result[plan(row)[1]]
                        for t in (trees if shared else [tree]):
                            samples[t.label][row].append(value)
                    shown = ", ".join(f"{r}={result[plan(r)[1]]:.2f}" for r in members)
                    print(f"  run {k + 1}/{args.runs} {tree.label:6} {shown}   load {loadavg()[0]}",
                          flush=True)
            loads.append(loadavg())
            # After every round, so that a run cut short still leaves its figures.
            write_report(build_report(k + 1, trees, loads, started, samples, details, failures, rows),
                         Path(args.out))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    report = build_report(args.runs, trees, loads, started, samples, details, failures, rows)
    over = report["over_budget"]
    write_report(report, Path(args.out))
    print((Path(args.out) / "results.md").read_text())
    if over:
        for r in over:
            value = report["median"]["after"].get(r)
            print(f"OVER BUDGET: {r} median {_cell(value)} s > budget {BUDGETS[r]:.1f} s",
                  file=sys.stderr)
        return 1
    return 0


def build_report(runs, trees, loads, started, samples, details, failures, rows) -> dict:
    med = {t.label: {r: statistics.median(v) for r, v in samples[t.label].items() if v} for t in trees}
    report = {
        "runs": runs,
        "rows": rows,
        "trees": {t.label: {"rev": t.rev, "layout": t.layout} for t in trees},
        "loadavg": loads,
        "cores": os.cpu_count(),
        "seconds": round(time.time() - started),
        "median": med,
        "samples": samples,
        "details": details,
        "failures": failures,
    }
    return with_budgets(report)


def with_budgets(report: dict) -> dict:
    med = report["median"]["after"]
    report["budgets"] = BUDGETS
    report["over_budget"] = [r for r in report["rows"] if r not in med or med[r] > BUDGETS[r]]
    return report


def write_report(report: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(render(report))


def _cell(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f}"


def render(report: dict) -> str:
    rows = report["rows"]
    med = report["median"]
    has_before = "before" in med
    head = "| what the user waits for | " + (f"before ({report['trees']['before']['rev']}) | " if has_before else "")
    head += f"after ({report['trees']['after']['rev']}) | budget |"
    lines = [
        "# Start-up costs (`benchmarks/startup/bench_startup.py`)",
        "",
        (f"Seconds, median of {report['runs']} fresh-process runs per cell, before and after "
         f"interleaved; {report['cores']} cores; load average (1/5/15 min) at start "
         f"{report['loadavg'][0]}, at end {report['loadavg'][-1]}. Rows marked * are Ray's or "
         "torch's own cost (same in both trees, measured once per round)."),
        "",
        head,
        "|---|" + ("---:|" if has_before else "") + "---:|---:|",
    ]
    for r in rows:
        star = " *" if r in SHARED else ""
        cells = [f"{TITLES[r]}{star}"]
        if has_before:
            cells.append(_cell(med["before"].get(r)))
        flag = " **over**" if r in report["over_budget"] else ""
        cells += [_cell(med["after"].get(r)) + flag, f"{BUDGETS[r]:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label in report["trees"]:
        tr = report["details"][label].get("train")
        if tr:
            keys = ("worker_started", "loop_ready", "first_step", "steps", "fit", "fit_overhead", "total", "wall")
            parts = ", ".join(f"{k} {statistics.median(d[k] for d in tr):.1f}" for k in keys)
            lines.append(f"- train timeline ({label}, medians, s from launch unless a duration): {parts}")
        mo = report["details"][label].get("model")
        if mo:
            lines.append(f"- tiny model ({label}, medians): import {statistics.median(d['import'] for d in mo):.2f} s, "
                         f"load_s {statistics.median(d['load_s'] for d in mo):.2f} s")
    imp = report["details"]["after"].get("import_torch_diffusers")
    if imp:
        lines.append(f"- import torch {statistics.median(d['torch'] for d in imp):.2f} s, then diffusers "
                     f"pipelines {statistics.median(d['diffusers'] for d in imp):.2f} s (medians)")
    lines.append("")
    if report.get("note"):
        lines.append(f"- {report['note']}")
    lines.append("Over budget: " + (", ".join(report["over_budget"]) or "none") + ".")
    if report["failures"]:
        lines.append("")
        lines.append("Failed runs: " + "; ".join(f.splitlines()[0] for f in report["failures"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
