"""Training checkpoints: everything needed to continue a run exactly.

One checkpoint is one directory `checkpoint-<step>` in the run directory, assembled by Ray Train
from what every worker reports at the same step:

    unet.safetensors, text_encoder.safetensors   trainable weights (all of them, or the LoRA adapters)
    optimizer.pt, lr_scheduler.pt, grad_scaler.pt  their state dicts (tensors and numbers only)
    rng-rank<r>.pt                              each worker's torch / CUDA / numpy / Python RNG states
    state.json                                  step, micro-step (the data position), world size,
                                                the files above; written last

Each worker writes into its own fresh local folder and renames every file into place, and Ray
Train copies the folders to storage and registers the checkpoint only once every worker's upload
has finished, so a checkpoint that a run can see is complete. `checkpoint_problem` checks that
again before anything is resumed from a folder: state.json readable, every file it lists and every
rank's RNG file present, at the size state.json recorded, and each file whole by its own format
(a safetensors header that accounts for the file's length, a torch zip with its central
directory), so a truncated or half-written copy (a full disk, a killed copy to shared storage) is
caught without loading it. `find_checkpoints` skips such folders and `latest_resumable` says
which newer ones it passed over and why. Ray's `CheckpointConfig(num_to_keep)` deletes the old.

The data order is a function of (seed, step) (raybooth.jobs.train.data), so the data position is
just the micro-step number; the RNG states cover anything else that draws random numbers.
"""

from __future__ import annotations

import json
import logging
import random
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raybooth.platform.errors import ConfigError
from raybooth.platform.paths import replace_into

log = logging.getLogger("raybooth.train")

STATE_FILE = "state.json"
FORMAT = 1
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


# ---------------------------------------------------------------------------------------------
# RNG states


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Writing


def write_checkpoint(directory: Path, *, rank: int, world_size: int, step: int, micro_step: int,
                     weights: dict[str, dict[str, torch.Tensor]] | None = None,
                     optimizer: dict | None = None, lr_scheduler: dict | None = None,
                     grad_scaler: dict | None = None, meta: dict[str, Any] | None = None) -> None:
    """Write this worker's part of the checkpoint for `step` into `directory`.

    Every rank writes its RNG states; rank 0 also writes the weights, the optimizer, scheduler and
    scaler states, and state.json (last). With DDP every rank holds the same weights and optimizer
    state, so one copy is enough.
    """
    directory.mkdir(parents=True, exist_ok=True)
    replace_into(directory / f"rng-rank{rank}.pt", lambda p: torch.save(capture_rng(), p))
    if rank != 0:
        return
    files = []
    for name, tensors in (weights or {}).items():
        replace_into(directory / f"{name}.safetensors", lambda p, t=tensors: save_file(t, str(p)))
        files.append(f"{name}.safetensors")
    for name, state in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler), ("grad_scaler", grad_scaler)):
        if state is not None:
            replace_into(directory / f"{name}.pt", lambda p, s=state: torch.save(s, p))
            files.append(f"{name}.pt")
    record = {
        "format": FORMAT,
        "step": step,
        "micro_step": micro_step,
        "world_size": world_size,
        "weights": sorted(weights or {}),
        "files": files,
        # Sizes of the files rank 0 wrote: a truncated copy is caught without reading it.
        "sizes": {name: (directory / name).stat().st_size for name in files},
        **(meta or {}),
    }
    replace_into(directory / STATE_FILE, lambda p: p.write_text(json.dumps(record, indent=2)))


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class TrainingState:
    """A checkpoint read back for one worker: everything `write_checkpoint` wrote, in memory."""

    directory: Path
    step: int
    micro_step: int
    world_size: int
    record: dict[str, Any]
    weights: dict[str, dict[str, torch.Tensor]]
    optimizer: dict | None
    lr_scheduler: dict | None
    grad_scaler: dict | None
    rng: dict[str, Any] | None  # this rank's; None if the checkpoint had fewer workers


def _torch_load(path: Path) -> Any:
    # weights_only: a checkpoint folder on shared storage must not be able to run code.
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def load_checkpoint(directory: str | Path, rank: int = 0) -> TrainingState:
    """Read a complete checkpoint (a ConfigError naming the folder if it is not one)."""
    directory = Path(directory)
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise ConfigError(
            f"{directory} is not a complete raybooth training checkpoint ({problem}); pick another "
            "checkpoint-* folder or use run.resume_from=latest",
            field="run.resume_from",
        )
    record = read_state(directory)
    return TrainingState(
        directory=directory,
        step=int(record["step"]),
        micro_step=int(record["micro_step"]),
        world_size=int(record["world_size"]),
        record=record,
        weights={name: load_file(str(directory / f"{name}.safetensors")) for name in record["weights"]},
        optimizer=_torch_load(directory / "optimizer.pt"),
        lr_scheduler=_torch_load(directory / "lr_scheduler.pt"),
        grad_scaler=_torch_load(directory / "grad_scaler.pt"),
        rng=_torch_load(directory / f"rng-rank{rank}.pt"),
    )


def load_checkpoint_or(directory: str | Path, fallback: str | Path | None, rank: int = 0) -> TrainingState | None:
    """`directory` (the checkpoint Ray Train hands a worker), or, when it cannot be resumed (a
    truncated copy of the latest), `fallback` (the complete one the driver chose; None: step 0),
    with a warning naming the folder passed over."""
    problem = checkpoint_problem(directory)
    if problem is None:
        return load_checkpoint(directory, rank)
    log.warning("training: warning: checkpoint %s is incomplete (%s); resuming from %s instead",
                directory, problem, fallback if fallback is not None else "step 0")
    return load_checkpoint(fallback, rank) if fallback is not None else None


def read_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _file_problem(path: Path, expected_size: int | None) -> str | None:
    """Why one checkpoint file cannot be whole, from its size and its format's own framing."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"{path.name} is {size} bytes, state.json recorded {expected_size} (truncated or half-written)"
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as fp:
                (header_len,) = struct.unpack("<Q", fp.read(8))
                if header_len > size - 8:
                    raise ValueError
                header = json.loads(fp.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
            return f"{path.name} is not a readable safetensors file (truncated?)"
        if size != 8 + header_len + end:
            return f"{path.name} is {size} bytes but its header describes {8 + header_len + end} (truncated)"
    elif path.suffix == ".pt" and not zipfile.is_zipfile(path):
        return f"{path.name} is not a complete torch file (truncated?)"
    return None


def checkpoint_problem(directory: str | Path) -> str | None:
    """None for a checkpoint that can be resumed from; else what is wrong with it."""
    directory = Path(directory)
    if not directory.is_dir():
        return "the folder does not exist"
    record = read_state(directory)
    if not record:
        return f"{STATE_FILE} is missing or unreadable (the checkpoint was not finished)"
    if record.get("format") != FORMAT:
        return f"{STATE_FILE} has format {record.get('format')!r}, expected {FORMAT}"
    try:
        world = int(record["world_size"])
        sizes = dict(record.get("sizes") or {})
        needed = list(record.get("files", [])) + [f"rng-rank{r}.pt" for r in range(world)]
    except (KeyError, TypeError, ValueError):
        return f"{STATE_FILE} lacks world_size or files"
    for name in needed:
        problem = _file_problem(directory / name, sizes.get(name))
        if problem:
            return problem
    return None


def is_complete(directory: str | Path) -> bool:
    return checkpoint_problem(directory) is None


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return [c for c in run_dir.iterdir() if c.is_dir() and CHECKPOINT_DIR.match(c.name)]


def find_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    found = []
    for child in _checkpoint_dirs(Path(run_dir)):
        if is_complete(child):
            found.append((int(read_state(child)["step"]), child))
    return sorted(found)


def latest_resumable(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint or None, [(newer folder, what is wrong with it)]): what
    `run.resume_from=latest` continues from, and what it had to pass over."""
    complete = find_checkpoints(run_dir)
    latest = complete[-1][1] if complete else None
    latest_step = complete[-1][0] if complete else -1
    skipped = []
    for child in sorted(_checkpoint_dirs(Path(run_dir)), key=lambda c: int(CHECKPOINT_DIR.match(c.name).group(1))):
        if int(CHECKPOINT_DIR.match(child.name).group(1)) > latest_step and not is_complete(child):
            skipped.append((child, checkpoint_problem(child) or "incomplete"))
    return latest, skipped


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = find_checkpoints(run_dir)
    return found[-1][1] if found else None
