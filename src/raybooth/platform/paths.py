"""Where raybooth keeps its state on one machine (`$RAYBOOTH_HOME`, default `~/.raybooth`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def publish_dir(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Build a folder beside `target`, then rename it into place in one step, so a reader (a Ray
    actor, a Serve replica, another training run) never sees half of it.

    Yields an empty temporary folder (readable by others: exports and models are shared). On a
    clean exit it becomes `target`. When `target` appeared meanwhile (another process built the
    same thing), `replace=False` keeps theirs (both built equal content), `replace=True` swaps
    ours in. On an error the temporary folder is removed and `target` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        yield tmp
        if replace and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
