"""Log lines go to the stderr logging was configured with, or to the current one once that
stream is closed."""

from __future__ import annotations

import io
import sys

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
