"""Library output a raybooth user cannot act on, silenced in one place.

- transformers 5 warns on every import of diffusers that its image processors "require
  torchvision … falling back": raybooth never uses those processors for images it decodes (and no
  torchvision wheel matches the CPU torch), so the two lines only alarm. They are dropped by a
  filter on the standard logger transformers logs through, installed before transformers is even
  imported (it costs no import).
- per-component loading bars of diffusers/transformers drown a command's own output and fill
  every Ray worker's log.
"""

from __future__ import annotations

import logging

# Substrings of log messages that say nothing a raybooth user can act on.
_NOISE = ("requires torchvision (not installed)",)
_NOISY_LOGGERS = ("transformers.utils.import_utils",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


def install_log_filters() -> None:
    """Idempotent; cheap (no library import)."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


def quiet_libraries(errors_only: bool = False) -> None:
    """No loading bars; with `errors_only`, no warnings either (training workers, where a dtype
    note per worker per load is noise)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    install_log_filters()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if errors_only:
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()


install_log_filters()
