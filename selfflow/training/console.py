"""What reaches the console: Lightning's start-up banners and tips ("GPU available: False", "TPU
available", "💡 Tip: ...", "`Trainer.fit` stopped") go to train.log only; its warnings and errors
still reach the console."""

from __future__ import annotations

import logging
import sys

LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class LibraryBanners(logging.Filter):
    """Drops a library's records below WARNING; selfflow's own records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_library = record.name.startswith(LIBRARY_LOGGERS)
        return not (from_library and record.levelno < logging.WARNING)


def _on_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return not isinstance(handler, logging.FileHandler) and stream in (sys.stdout, sys.stderr)


def keep_library_banners_off_the_console() -> None:
    """Add the filter to every console handler that Lightning's records reach: the root's (Hydra's
    console, when Lightning propagates) and Lightning's own (when it was imported before logging was
    set up)."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in LIBRARY_LOGGERS)]
    for handler in (h for logger in loggers for h in logger.handlers if _on_console(h)):
        if not any(isinstance(f, LibraryBanners) for f in handler.filters):
            handler.addFilter(LibraryBanners())
