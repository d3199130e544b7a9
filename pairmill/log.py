"""Progress lines go through ``logging``: library code logs to ``logging.getLogger(__name__)``
and never prints; the CLI (and each Ray Train worker, for its own lines) decides what is shown
with ``configure``. A library user who configures nothing sees warnings and errors only."""

from __future__ import annotations

import logging
import sys

PACKAGES = ("pairmill", "pipelines", "mining", "training", "tune")
FORMAT = "[pairmill] %(message)s"


class _CurrentStdout:
    """``sys.stdout`` as it is when a line is written (pytest and notebooks swap it)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def configure(level: int | str = logging.INFO, stream=None) -> None:
    """Show the project's log lines at ``level`` and above on ``stream`` (default: the current
    stdout), once each: the packages' loggers get one handler and do not propagate to the root."""
    handler = logging.StreamHandler(stream if stream is not None else _CurrentStdout())
    handler.setFormatter(logging.Formatter(FORMAT))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def level() -> int:
    """The level the project logs at in this process, to hand to Ray workers."""
    return logging.getLogger("pairmill").getEffectiveLevel()
