"""A truncated or half-written latest checkpoint: `run.resume_from=latest` falls back to the
previous complete one with a warning naming the folder it passed over, and a worker that Ray
hands the broken one does the same."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from raybooth.jobs.train.checkpoints import (
    checkpoint_problem,
    find_checkpoints,
    latest_resumable,
    load_checkpoint_or,
    write_checkpoint,
)
from raybooth.jobs.train.inputs import check_inputs, check_resume
from raybooth.platform.config import TrainConfig, with_overrides
from raybooth.platform.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

SUBJECT = Path(__file__).resolve().parents[1] / "examples" / "demo-subject"


def _write(directory: Path, step: int, world: int = 2) -> None:
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 64)).sum().backward()
    opt.step()
    for rank in range(world):
        write_checkpoint(
            directory, rank=rank, world_size=world, step=step, micro_step=step,
            weights={"unet": {k: v.detach().clone() for k, v in model.state_dict().items()}} if rank == 0 else None,
            optimizer=opt.state_dict() if rank == 0 else None, meta={"mode": "full", "train_text_encoder": True},
        )


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _drop_sizes(directory: Path) -> None:
    """As a checkpoint written before sizes were recorded: only the formats' own framing is left."""
    state = json.loads((directory / "state.json").read_text())
    state.pop("sizes")
    (directory / "state.json").write_text(json.dumps(state))


DAMAGE = {
    "weights truncated": (lambda d: _truncate(d / "unet.safetensors"), "unet.safetensors is"),
    "weights truncated (old record)": (lambda d: (_drop_sizes(d), _truncate(d / "unet.safetensors", 0.9)),
                                       "header describes"),
    "optimizer truncated": (lambda d: _truncate(d / "optimizer.pt"), "optimizer.pt is"),
    "rng of rank 1 truncated (old record)": (lambda d: (_drop_sizes(d), _truncate(d / "rng-rank1.pt")),
                                             "rng-rank1.pt is not a complete torch file"),
    "rng of rank 1 missing": (lambda d: (d / "rng-rank1.pt").unlink(), "rng-rank1.pt is missing"),
    "state.json half-written": (lambda d: _truncate(d / "state.json"), "state.json is missing or unreadable"),
    "state.json never written": (lambda d: (d / "state.json").unlink(), "state.json is missing or unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_resume_latest_falls_back_to_the_previous_complete_checkpoint_naming_the_broken_one(
        tmp_path, caplog, damage):
    config = with_overrides(TrainConfig(), {
        "subject.instance_data_dir": str(SUBJECT), "run.storage_path": str(tmp_path / "runs"),
        "run.name": "r", "tracking.enabled": False, "priors.enabled": False, "scaling.num_workers": 2,
        "run.resume_from": "latest",
    })
    inputs = check_inputs(config)
    good, broken = inputs.run_dir / "checkpoint-000004", inputs.run_dir / "checkpoint-000008"
    _write(good, 4)
    _write(broken, 8)
    assert checkpoint_problem(broken) is None
    damage_fn, problem = DAMAGE[damage]
    damage_fn(broken)
    assert problem in (checkpoint_problem(broken) or ""), checkpoint_problem(broken)
    assert [s for s, _ in find_checkpoints(inputs.run_dir)] == [4]
    assert latest_resumable(inputs.run_dir)[0] == good

    with caplog.at_level(logging.WARNING, logger="raybooth.train"):
        assert check_resume(config, inputs) == good
    warned = [r.getMessage() for r in caplog.records if "incomplete" in r.getMessage()]
    assert len(warned) == 1 and str(broken) in warned[0] and problem in warned[0] and str(good) in warned[0]

    # In the worker: Ray hands over its latest (the broken one); the driver's choice is loaded.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raybooth.train"):
        state = load_checkpoint_or(broken, good, rank=1)
    assert state is not None and state.step == 4 and state.rng is not None
    assert any(str(broken) in r.getMessage() for r in caplog.records)
    # Named explicitly, the broken folder is an error that says what is wrong with it.
    named = with_overrides(config, {"run.resume_from": str(broken)})
    with pytest.raises(ConfigError, match="not a complete training checkpoint") as err:
        check_resume(named, inputs)
    assert problem in err.value.message


def test_only_a_broken_checkpoint_starts_from_step_0_with_the_warning(tmp_path, caplog):
    run = tmp_path / "run"
    _write(run / "checkpoint-000002", 2, world=1)
    _truncate(run / "checkpoint-000002" / "unet.safetensors")
    latest, skipped = latest_resumable(run)
    assert latest is None and [p.name for p, _ in skipped] == ["checkpoint-000002"]
    with caplog.at_level(logging.WARNING, logger="raybooth.train"):
        assert load_checkpoint_or(run / "checkpoint-000002", None) is None
    assert "step 0" in caplog.text
