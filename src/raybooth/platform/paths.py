"""Where raybooth keeps its state on one machine (`$RAYBOOTH_HOME`, default `~/.raybooth`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def raybooth_home() -> Path:
    home = Path(os.environ.get("RAYBOOTH_HOME", "~/.raybooth")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def models_dir() -> Path:
    path = raybooth_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def replace_into(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temporary file beside it and rename, so a reader (another worker,
    a resumed run, the driver) sees the old file or the new one, never half of one.

    The temporary name keeps the suffix (PIL picks the format from it) and carries the pid, so
    two processes writing the same file do not share a temporary.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any, indent: int | None = 2) -> None:
    replace_into(path, lambda tmp: tmp.write_text(json.dumps(data, indent=indent, default=str)))
