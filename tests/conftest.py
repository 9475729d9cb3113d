"""What every tier shares: each test is marked by its folder (its tier), and ``observe``
records what a reliability scenario did.

A test's folder under tests/ is its tier, and the hook below marks it so (``-m unit``,
``-m "not integration"``): a test cannot be in one folder and run as another tier, and a
test outside the four tier folders is an error at collection, not a test nobody selects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.reliability import SCENARIOS, Observation, save_observations

#: the tier folders under tests/, each also the marker its tests carry
TIERS = ("unit", "integration", "e2e", "install")
TESTS = Path(__file__).resolve().parent


def tier_of(path: Path) -> str | None:
    """The tier of a test file: its first folder under tests/, if that is a tier folder."""
    try:
        parts = path.resolve().relative_to(TESTS).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 and parts[0] in TIERS else None


def mark_tiers(items: Sequence[pytest.Item]) -> None:
    """Mark every item with its folder's tier; any item outside the tier folders, or marked
    as another tier than its folder's, is a usage error naming each one."""
    misplaced: list[str] = []
    for item in items:
        tier = tier_of(item.path)
        if tier is None:
            # outside the rootdir a node id is only "::name"
            where = f"{item.path}{item.nodeid}" if item.nodeid.startswith("::") else item.nodeid
            misplaced.append(f"{where}: not under tests/{{{','.join(TIERS)}}}/")
            continue
        others = sorted({m.name for m in item.iter_markers() if m.name in TIERS} - {tier})
        if others:
            misplaced.append(f"{item.nodeid}: in tests/{tier}/ but marked {', '.join(others)}")
            continue
        item.add_marker(tier)
    if misplaced:
        raise pytest.UsageError(
            "every test belongs to the tier its folder names (tests/unit, tests/integration, "
            "tests/e2e, tests/install):\n  " + "\n  ".join(misplaced)
        )


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tiers(items)


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
