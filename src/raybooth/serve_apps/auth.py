"""Optional API keys: `Authorization: Bearer <key>`, compared in constant time.

Keys come from an environment variable (comma- or whitespace-separated) and/or a file (one key
per line, `#` comments). The file is re-read when it changes, so keys rotate without a restart.
With no key configured the API is open, and the ingress says so in its log at start.
"""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path

from raybooth.platform.errors import ConfigError
from raybooth.serve_apps.settings import AuthSettings

MIN_KEY_CHARS = 16


class ApiKeys:
    def __init__(self, settings: AuthSettings):
        self.settings = settings
        self._env_keys = _split(os.environ.get(settings.api_keys_env, ""))
        self._file_keys: list[bytes] = []
        self._file_mtime: float | None = None
        self._reload_file()
        short = [k for k in self._all() if len(k) < MIN_KEY_CHARS]
        if short:
            raise ConfigError(
                f"API keys must be at least {MIN_KEY_CHARS} characters ({len(short)} shorter); "
                "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
                field="auth",
            )
        if settings.required and not self.enabled:
            raise ConfigError(
                f"auth.required is true but no API key is configured: set {settings.api_keys_env} "
                "or auth.api_keys_file",
                field="auth",
            )

    def _reload_file(self) -> None:
        if not self.settings.api_keys_file:
            return
        path = Path(self.settings.api_keys_file).expanduser()
        try:
            mtime = path.stat().st_mtime
        except OSError:
            raise ConfigError(f"auth.api_keys_file {path} cannot be read", field="auth.api_keys_file") from None
        if mtime != self._file_mtime:
            lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
            self._file_keys = [k.encode() for k in lines if k]
            self._file_mtime = mtime

    def _all(self) -> list[bytes]:
        return self._env_keys + self._file_keys

    @property
    def enabled(self) -> bool:
        return bool(self._all())

    def check(self, authorization: str | None) -> bool:
        """True when the header carries a configured key (always True when auth is off)."""
        try:
            self._reload_file()
        except ConfigError:
            pass  # keep the keys read last: a file being rewritten must not open or close the API
        keys = self._all()
        if not keys:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        # Compare with every key, without stopping at a match: the time does not depend on which.
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(given, key)
        return matched


def _split(text: str) -> list[bytes]:
    return [k.encode() for k in re.split(r"[,\s]+", text) if k]
