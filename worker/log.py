"""structlog setup: JSON lines for workers, readable lines for a terminal."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging", "get_logger"]


class _Stderr:
    """The stderr of when logging was configured (a worker's real stderr, before Celery
    redirects it into its own logger), or, once that stream is closed, the stderr of the
    moment: an in-process CLI runner swaps stderr for a stand-in it closes afterwards."""

    def __init__(self) -> None:
        self.stream = sys.stderr

    def write(self, text: str) -> int:
        stream = sys.stderr if self.stream.closed else self.stream
        return stream.write(text)

    def flush(self) -> None:
        stream = sys.stderr if self.stream.closed else self.stream
        stream.flush()


def configure_logging(level: str = "INFO", json: bool = True) -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
