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

    def __reduce__(self):
        # Errors cross process boundaries (a Ray Train worker, a Tune trial, the Serve replica):
        # rebuild from message, field and attributes, whatever a subclass's __init__ takes.
        return _restore_user_error, (type(self), self.message, self.field, dict(self.__dict__))


def _restore_user_error(cls: type, message: str, field: str | None, state: dict) -> "UserError":
    error = cls.__new__(cls)
    UserError.__init__(error, message, field=field)
    error.__dict__.update(state)
    return error


class ConfigError(UserError):
    """A configuration file or `--set` override is wrong."""


class ImageError(UserError):
    """An image or mask file cannot be used."""


class ModelError(UserError):
    """A model reference cannot be resolved or loaded."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The UserError behind an exception that crossed a Ray boundary (RayTaskError keeps the
    original as `cause`; Python's chain as `__cause__`), or None when no user error is why."""
    seen = exc
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or getattr(seen, "cause", None)
    return None
