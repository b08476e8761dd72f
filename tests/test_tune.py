"""`raybooth tune` on the tiny model (CPU): a real Ray (with its dashboard) and a real Tune sweep.

- A bad space key (or a value of the wrong type) is refused before Ray starts.
- 4 trials, 2 at a time, one with a diverging learning rate: ASHA stops that one at its first
  report (fewer iterations than the others); one whose loss turns NaN errors (the sweep goes on);
  one has its Ray Train worker killed mid-trial and continues from its checkpoint, within the same
  trial; sweep.json lists every trial; MLflow has the sweep's
  parent run with one nested child per trial; the best trial is registered under `sweep-best` with
  tags linking the sweep and the trial; the plot exists.
- The driver (`raybooth tune` in a subprocess) is SIGKILLed mid-sweep; `--resume` finishes it
  without running a finished trial again, in the same MLflow parent run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _train_support import DEMO_SUBJECT

from raybooth.platform.errors import ConfigError
from raybooth.tune.config import load_sweep
from raybooth.tune.sweep import ERRORED, FINISHED, STOPPED, SweepResult, run_sweep
from raybooth.tune.trial import STARTS_FILE

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DIVERGING_LR = 0.5  # a loss that climbs (to ~100) but stays finite: ASHA stops the trial
NAN_LR = 1e30  # weights blown up at once: the loss is NaN before the first report, the trial errors
KILLED_LR = 3e-4  # the best of the grid (ASHA keeps it), whose Ray Train worker is SIGKILLed mid-trial


def _base(tmp: Path) -> Path:
    """A tiny-model training config of a few seconds a step: 3 checkpoint reports per trial. Its
    paths are relative, as in the shipped configs (the sweeps run with `tmp` as the working
    directory), so trials that run in their own folders must still find them."""
    import shutil

    if not (tmp / "subject").is_dir():
        shutil.copytree(DEMO_SUBJECT, tmp / "subject")
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump({
        "model": "tiny",
        "subject": {"instance_data_dir": "subject"},
        "priors": {"enabled": False},
        "train": {"resolution": 32, "batch_size": 1, "max_steps": 6, "checkpoint_every": 2,
                  "keep_checkpoints": 1, "log_every": 1, "validation_prompts": [],
                  "train_text_encoder": False},
        "run": {"storage_path": "runs", "max_failures": 1},
        "tracking": {"enabled": True, "experiment": "tune-test", "register_as": "tune-test-subject"},
    }))
    return path


def _sweep(tmp: Path, name: str, space: dict, **extra) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(_base(tmp)),
        "space": space,
        "search": {"algorithm": "grid"},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "objective": {"metric": "loss", "mode": "min"},
        "max_concurrent_trials": 2,
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
        "sweep": {"name": name},
        "tracking": {"alias": "sweep-best"},
        **extra,
    }))
    return path


@pytest.fixture
def no_ray():
    """Sweeps start their own Ray (with the dashboard): end one a previous test left running."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key, spec, words", [
    ("train.learnig_rate", {"loguniform": [1e-5, 1e-3]}, ["space.train.learnig_rate", "learning_rate"]),
    ("train.lora_rank", {"choice": [4, "big"]}, ["space.train.lora_rank", "'big'"]),
    ("train.learning_rate", {"uniform": [-1.0, 1e-3]}, ["space.train.learning_rate", "-1.0"]),
    ("run.name", {"choice": ["a", "b"]}, ["space.run.name", "the sweep sets"]),
    ("train.learning_rate", {"normal": [0, 1]}, ["space.train.learning_rate", "loguniform"]),
])
def test_bad_space_refused_before_ray(tmp_path, key, spec, words):
    import ray

    was_running = ray.is_initialized()
    with pytest.raises(ConfigError) as err:
        load_sweep(_sweep(tmp_path, "bad", {key: spec}))
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message
    assert ray.is_initialized() == was_running  # nothing started


@pytest.mark.timeout(30)
@pytest.mark.parametrize("metric, words", [
    ("eval/toy_subject", ["eval/toy_subject", "toy-based", "'tiny'"]),
    ("eval/clip_i + eval/dinoo", ["eval/dinoo", "eval/dino, eval/toy_prompt"]),
])
def test_objective_names_a_metric_evaluation_reports(tmp_path, metric, words):
    path = _sweep(tmp_path, "bad-objective", {"train.learning_rate": {"grid": [1e-4]}},
                  objective={"metric": metric, "mode": "max"},
                  set={"train.checkpoint_every": 2, "evaluation.every": 2})
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    for w in words:
        assert w in str(err.value), str(err.value)


@pytest.mark.timeout(60)
def test_optuna_search_suggests_seeded_values_inside_the_space_and_refuses_grids(tmp_path):
    """`search.algorithm: optuna`: Ray Tune's OptunaSearch (TPE) behind a concurrency limit, fed
    the objective of finished trials; the same seed suggests the same values."""
    from raybooth.tune.config import OBJECTIVE_KEY
    from raybooth.tune.space import tune_space
    from raybooth.tune.sweep import search_algorithm

    space = {"train.learning_rate": {"loguniform": [1e-5, 1e-3]}, "train.lora_rank": {"choice": [4, 8, 16]}}
    loaded = load_sweep(_sweep(tmp_path, "tpe", space, search={"algorithm": "optuna", "num_samples": 6, "seed": 3}))

    def suggestions() -> list[dict]:
        from ray.tune.search.optuna import OptunaSearch

        alg = search_algorithm(loaded)
        assert isinstance(alg.searcher, OptunaSearch)  # what the config asked for, not random sampling
        assert alg.set_search_properties(OBJECTIVE_KEY, "min", tune_space(loaded.dims))
        out = []
        for i in range(6):
            config = alg.suggest(f"t{i}")
            assert config is not None
            out.append(config)
            # A finished trial's objective is what TPE learns from.
            alg.on_trial_complete(f"t{i}", {OBJECTIVE_KEY: config["train.learning_rate"] * 1e3, "training_iteration": 1})
        return out

    first = suggestions()
    assert all(1e-5 <= c["train.learning_rate"] <= 1e-3 and c["train.lora_rank"] in (4, 8, 16) for c in first)
    assert len({c["train.learning_rate"] for c in first}) == 6
    assert suggestions() == first  # seeded

    with pytest.raises(ConfigError, match="space.train.learning_rate.*grid"):
        load_sweep(_sweep(tmp_path, "tpe-grid", {"train.learning_rate": {"grid": [1e-4, 2e-4]}},
                          search={"algorithm": "optuna", "num_samples": 2}))


@pytest.mark.timeout(30)
def test_shipped_sweep_configs_load():
    repo = Path(__file__).resolve().parents[1]
    for name in ("tiny.yaml", "sd15-lora.yaml"):
        loaded = load_sweep(repo / "configs" / "tune" / name)
        assert loaded.num_trials >= 4
    # The CPU sweep optimises what the toy judge sees, not the training loss.
    assert load_sweep(repo / "configs" / "tune" / "tiny.yaml").objective.metrics == [
        "eval/toy_subject", "eval/toy_prompt"]


class TrialWorkerKiller:
    """SIGKILLs the rank-0 Ray Train worker of the trial sampled with `lr`, once that trial has a
    registered checkpoint and has trained past it (what a node or OOM kill does to a trial)."""

    def __init__(self, sweep_dir: Path, lr: float):
        import threading

        self.trials, self.lr, self.killed = sweep_dir / "trials", lr, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _trial_dir(self) -> Path | None:
        for starts in self.trials.glob(f"*/{STARTS_FILE}"):
            try:
                first = json.loads(starts.read_text().splitlines()[0])
            except (IndexError, ValueError, OSError):  # not written yet, or caught mid-write
                continue
            if first["config"]["train.learning_rate"] == self.lr:
                return starts.parent
        return None

    def _loop(self) -> None:
        from _train_support import registered_checkpoint

        from raybooth.jobs.train.metrics import step_metrics

        deadline = time.monotonic() + 600
        while not self.done.is_set() and time.monotonic() < deadline:
            run_dir = self._trial_dir()
            if run_dir is not None and registered_checkpoint(run_dir):
                steps = step_metrics(run_dir)
                if steps and 3 <= max(steps) < 6:  # past a checkpoint, before the last step
                    try:
                        info = json.loads((run_dir / "workers" / "rank-0.json").read_text())
                    except (ValueError, OSError):
                        continue
                    self.killed.update(info, at_step=max(steps), run_dir=run_dir)
                    os.kill(info["pid"], signal.SIGKILL)
                    return
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(5)


@pytest.mark.timeout(900)
def test_sweep_asha_mlflow_registry(tmp_path, no_ray, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # In this order, 2 at a time: 2e-4 and KILLED_LR reach ASHA's first rung before DIVERGING_LR.
    grid = [2e-4, KILLED_LR, DIVERGING_LR, NAN_LR]
    loaded = load_sweep(_sweep(tmp_path, "lr", {"train.learning_rate": {"grid": grid}}))
    t0 = time.perf_counter()
    with TrialWorkerKiller(tmp_path / "runs" / "sweeps" / "lr", KILLED_LR) as killer:
        result = run_sweep(loaded, num_cpus=4)
    print(f"sweep of {len(grid)} trials: {time.perf_counter() - t0:.1f} s")
    again = SweepResult.read(result.sweep_dir / "sweep.json")
    assert again == result
    assert len(result.trials) == len(grid)
    by_lr = {t.config["train.learning_rate"]: t for t in result.trials}
    diverging = by_lr[DIVERGING_LR]
    others = [by_lr[lr] for lr in (2e-4, KILLED_LR)]
    # ASHA cut the diverging trial at its first rung; the best ran all 3 reports.
    assert diverging.status == STOPPED, result.to_json()
    assert diverging.iterations == 1
    assert diverging.iterations < max(t.iterations for t in others)
    best = result.best
    assert best is not None and best.status == FINISHED and best.iterations == 3
    assert best.config["train.learning_rate"] not in (DIVERGING_LR, NAN_LR)
    assert result.plot is not None and result.plot.is_file()

    # The NaN trial errored with the reason, and the sweep went on.
    nan = by_lr[NAN_LR]
    assert nan.status == ERRORED and nan.iterations == 0
    assert nan.error.startswith("training diverged: the loss was nan"), nan.error
    out = capsys.readouterr()
    assert f"trial {nan.trial_id} errored: training diverged: the loss was nan" in out.out, [
        line for line in out.out.splitlines() if f"{nan.trial_id} errored" in line]
    assert "Trial task failed" not in out.err  # no traceback for a user error: the line says why

    # The killed worker: Ray Train restarted it inside the same trial, from the checkpoint.
    assert killer.killed, "no worker was killed"
    killed = by_lr[KILLED_LR]
    assert killed.status == FINISHED and killed.run_dir.resolve() == killer.killed["run_dir"].resolve()
    assert _starts(killed.run_dir) == 1  # one start of the trial: the restart was Ray Train's
    from raybooth.jobs.train.metrics import read_records

    resumed = [r for r in read_records(killed.run_dir) if r.get("event") == "resumed"]
    assert len(resumed) == 1 and 2 <= resumed[0]["step"] <= killer.killed["at_step"]
    restarted = json.loads((killed.run_dir / "workers" / "rank-0.json").read_text())
    assert restarted["pid"] != killer.killed["pid"]

    # MLflow: the parent, one nested child per trial (the trial's training run), the best registered.
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["raybooth.sweep"] == "lr"
    assert parent.data.tags["raybooth.sweep.best_trial"] == best.trial_id
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.info.run_id for c in children} == {t.mlflow_run_id for t in result.trials}
    child = client.get_run(best.mlflow_run_id)
    assert float(child.data.params["train.learning_rate"]) == best.config["train.learning_rate"]
    assert {m.step for m in client.get_metric_history(child.info.run_id, "loss")} == set(range(1, 7))
    assert client.get_run(diverging.mlflow_run_id).info.status == "KILLED"
    assert client.get_run(nan.mlflow_run_id).info.status == "FAILED"
    version = client.get_model_version_by_alias("tune-test-subject", "sweep-best")
    assert str(version.version) == str(result.registered_version)
    assert version.run_id == best.mlflow_run_id
    assert version.tags["sweep"] == "lr"
    assert version.tags["sweep.trial_id"] == best.trial_id
    assert version.tags["sweep.parent_run_id"] == result.parent_run_id


def _starts(run_dir: Path) -> int:
    path = run_dir / STARTS_FILE
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.timeout(900)
def test_resume_after_driver_killed(tmp_path, no_ray, raybooth_home):
    # With an end-of-training evaluation: its actor pool starts inside the trial (whose placement
    # group holds only a token CPU) and must be placed outside it.
    evaluation = {"prompts": ["a sks robot toy on the beach"], "images_per_prompt": 1, "num_actors": 1,
                  "dino_encoder": "tiny-dino", "clip_encoder": "tiny-clip", "steps": 2, "resolution": 32,
                  "bootstrap_samples": 100}
    config = _sweep(tmp_path, "resume", {"train.learning_rate": {"grid": [1e-4, 2e-4]}},
                    max_concurrent_trials=1, scheduler={"type": "none"}, set={"evaluation": evaluation})
    sweep_dir = tmp_path / "runs" / "sweeps" / "resume"
    cmd = [sys.executable, "-m", "raybooth.cli", "tune", "--config", str(config), "--num-cpus", "3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=tmp_path)
    try:
        # Kill once the first trial has finished and the second has started.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            trials = sorted((sweep_dir / "trials").glob("*")) if (sweep_dir / "trials").is_dir() else []
            done = [d for d in trials if (d / "summary.json").is_file()]
            if done and len(trials) == 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = {d.name: _starts(d) for d in (sweep_dir / "trials").glob("*")}
    finished_first = [d.name for d in (sweep_dir / "trials").glob("*") if (d / "summary.json").is_file()]
    parent_before = json.loads((sweep_dir / "mlflow_run.json").read_text())["run_id"]
    assert not (sweep_dir / "sweep.json").exists()

    out = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=360, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    path = Path(out.stdout.strip().splitlines()[-1])
    result = SweepResult.read(path)
    assert result.resumed and result.parent_run_id == parent_before
    assert [t.status for t in result.trials] == [FINISHED, FINISHED]
    for t in result.trials:
        assert (t.run_dir / "evaluation" / "evaluation.json").is_file()
    for name in finished_first:
        assert _starts(sweep_dir / "trials" / name) == first[name] == 1  # not run again
    from mlflow import MlflowClient

    children = MlflowClient().search_runs(
        [MlflowClient().get_run(parent_before).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_before}'")
    assert len(children) == 2


@pytest.mark.parametrize("ended_as, decided, expected", [
    ("RUNNING", "KILLED", "KILLED"),    # the stopped trial's actor was killed before it ended its run
    ("FAILED", "KILLED", "KILLED"),     # the stop reached the training job as an exception first
    ("FINISHED", "KILLED", "FINISHED"),  # it finished before the stop: left alone
    ("RUNNING", "FAILED", "FAILED"),    # an errored trial
    ("FINISHED", "FAILED", "FINISHED"),
])
def test_driver_ends_a_trial_run_with_what_tune_decided(tmp_path, ended_as, decided, expected):
    """Which of RUNNING / FAILED a run that ASHA stopped is left in is a race inside Ray; the
    sweep's driver makes the MLflow run say what Tune decided either way."""
    import mlflow

    from raybooth.tune.tracking import close_child_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("trial-status"))
    if ended_as != "RUNNING":
        client.set_terminated(run.info.run_id, ended_as)
    close_child_run(uri, run.info.run_id, decided)
    assert client.get_run(run.info.run_id).info.status == expected
