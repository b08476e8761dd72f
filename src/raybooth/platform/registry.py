"""The MLflow model registry as a model reference (`models:/NAME@ALIAS`, `models:/NAME/VERSION`).

Filled in by the MLflow part; until then such references are refused with a clear message.
"""

from __future__ import annotations

from raybooth.platform.config import ModelOptions
from raybooth.platform.errors import ModelError


def resolve_registered_model(ref: str, options: ModelOptions):
    raise ModelError(f"model {ref!r}: MLflow registry references are not available yet", field="model")
