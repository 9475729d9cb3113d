"""Log lines go to the stderr logging was configured with, or to the current one once that
stream is closed."""

from __future__ import annotations

import gc
import io
import json
import sys
import threading

import pytest

from worker.log import configure_logging, get_logger


def test_a_swapped_and_closed_stderr_is_not_written_to(monkeypatch: pytest.MonkeyPatch) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("INFO", json=True)  # an in-process CLI run configures logging...
    first.close()  # ...and its runner closes the stream it swapped in
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("test").warning("after the swap", n=1)
    assert '"event": "after the swap"' in second.getvalue()


def test_the_configured_stream_keeps_the_lines_while_open(monkeypatch: pytest.MonkeyPatch) -> None:
    configured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", configured)
    configure_logging("INFO", json=True)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # as Celery redirects a worker's stderr
    get_logger("test").warning("still here")
    assert '"event": "still here"' in configured.getvalue()


class _Raises:
    def __del__(self) -> None:
        raise RuntimeError("in __del__")


def test_exceptions_python_prints_by_itself_are_json_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception that ends a thread or escapes a ``__del__``: one JSON record each, with
    the traceback inside it, never raw traceback lines between the records."""
    for name in ("excepthook", "unraisablehook"):
        monkeypatch.setattr(sys, name, getattr(sys, name))  # restored after the test
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO", json=True)

    def fail() -> None:
        raise ValueError("in a thread")

    thread = threading.Thread(target=fail, name="sweeper")
    thread.start()
    thread.join()
    _Raises()
    gc.collect()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_event = {r["event"]: r for r in records}
    assert (
        "ValueError: in a thread" in by_event["uncaught exception in thread sweeper"]["exception"]
    )
    [unraisable] = [r for r in records if "__del__" in r["event"]]
    assert "RuntimeError: in __del__" in unraisable["exception"]
