"""Where raybooth keeps its state on one machine (`$RAYBOOTH_HOME`, default `~/.raybooth`)."""

from __future__ import annotations

import os
from pathlib import Path


def raybooth_home() -> Path:
    home = Path(os.environ.get("RAYBOOTH_HOME", "~/.raybooth")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def models_dir() -> Path:
    path = raybooth_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
