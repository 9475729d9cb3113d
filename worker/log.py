"""Logging: one handler on stderr, one format for every line.

modq's own events (structlog) and every standard-library record (Celery's "Task ...
succeeded", kombu's reconnects, warnings from libraries) pass through the same
``ProcessorFormatter`` and the same handler, so a worker writes JSON lines and nothing else
on stderr, and two threads never interleave inside a line: the handler writes each record,
newline included, in one call under its lock. modq's loggers and Celery's log at the
configured level; other libraries at WARNING, so a terminal run is not buried in their
chatter."""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]

#: Loggers shown at the configured level; everything else at WARNING and above.
OWN_LOGGERS = ("worker", "celery")


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


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler modq installs, told apart from anyone else's (pytest's capture) when
    logging is configured again."""


def configure_logging(level: str = "INFO", json: bool = True) -> None:
    """Route structlog and the standard library through one handler on stderr: JSON lines
    when ``json``, else readable lines for a terminal. Calling it again replaces modq's
    handler and keeps any other."""
    numeric = logging.getLevelName(level.upper())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    handler = _Handler(_Stderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # A traceback is one JSON string, never raw lines between records.
                *([structlog.processors.format_exc_info] if json else []),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _Handler)] + [handler]
    root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
    logging.captureWarnings(True)
    if json:
        _route_uncaught_exceptions()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def _route_uncaught_exceptions() -> None:
    """What Python prints by itself (an exception that ends a thread, an exception in a
    ``__del__`` or an atexit callback, one that ends the main thread) goes through the
    handler too, as one JSON record with its traceback, instead of raw lines on stderr."""
    uncaught = logging.getLogger("worker.uncaught")

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        info = (args.exc_type, args.exc_value, args.exc_traceback)
        uncaught.error("uncaught exception in thread %s", name, exc_info=info)  # type: ignore[arg-type]

    def unraisable_hook(unraisable: Any) -> None:
        info = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
        message = unraisable.err_msg or "exception ignored"
        uncaught.error("%s: %r", message, unraisable.object, exc_info=info)

    def main_hook(
        kind: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        uncaught.critical("uncaught exception", exc_info=(kind, value, tb))

    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook
    sys.excepthook = main_hook


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
