"""Fixtures every tier shares: ``observe`` records what a reliability scenario did."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.reliability import SCENARIOS, Observation, save_observations

_observations: list[Observation] = []
_by_test: dict[str, list[Observation]] = {}

Observe = Callable[..., Observation]


@pytest.fixture
def observe(request: pytest.FixtureRequest) -> Iterator[Observe]:
    """``observe(scenario, observed, sent=…, received=…, lost=…, duplicates=…)`` adds a row
    to the reliability table (``tests/support/reliability.py``); the row records whether the
    test then passed."""
    test = request.node.nodeid

    def record(scenario: str, observed: str, **counts: Any) -> Observation:
        if scenario not in SCENARIOS:
            raise KeyError(f"undeclared reliability scenario {scenario!r}")
        observation = Observation(scenario, observed, test=test, **counts)
        _by_test.setdefault(test, []).append(observation)
        _observations.append(observation)
        return observation

    yield record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" or (report.when == "setup" and report.failed):
        for observation in _by_test.get(item.nodeid, []):
            observation.outcome = report.outcome
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _observations:
        save_observations(_observations)
