"""Errors a user can cause. The CLI prints their message (no traceback) and exits non-zero;
the HTTP layer turns them into 4xx responses naming `field`."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a config key, a file, a model reference, a request field."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class ConfigError(UserError):
    """A configuration file or `--set` override is wrong."""


class ImageError(UserError):
    """An image or mask file cannot be used."""


class ModelError(UserError):
    """A model reference cannot be resolved or loaded."""
