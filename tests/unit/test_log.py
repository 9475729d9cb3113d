"""Log lines go to whatever stderr is when they are written."""

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
