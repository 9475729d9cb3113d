"""The test tiers: every test is marked by its folder (tests/conftest.py), a test outside the
tier folders stops the run, and no test skips because its server is missing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TESTS, TIERS, mark_tiers, tier_of


def test_a_file_s_tier_is_its_folder_under_tests() -> None:
    assert tier_of(TESTS / "unit" / "test_x.py") == "unit"
    assert tier_of(TESTS / "unit" / "models" / "test_x.py") == "unit"
    assert tier_of(TESTS / "integration" / "test_x.py") == "integration"
    assert tier_of(TESTS / "e2e" / "test_x.py") == "e2e"
    assert tier_of(TESTS / "install" / "test_x.py") == "install"
    assert tier_of(TESTS / "test_x.py") is None
    assert tier_of(TESTS / "support" / "test_x.py") is None
    assert tier_of(TESTS.parent / "bench" / "test_x.py") is None


def test_every_collected_test_carries_its_folder_s_tier_and_no_other(
    request: pytest.FixtureRequest,
) -> None:
    items = request.session.items
    assert request.node in items
    for item in items:
        tiers = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
        assert tiers == {tier_of(item.path)}, item.nodeid


class _Item:
    """What mark_tiers reads of a pytest item."""

    def __init__(self, path: Path, *markers: str) -> None:
        self.path = path
        self.nodeid = str(path.relative_to(TESTS.parent)) + "::test_it"
        self.markers = list(markers)

    def iter_markers(self) -> Iterator[pytest.Mark]:
        return iter(getattr(pytest.mark, name).mark for name in self.markers)

    def add_marker(self, name: str) -> None:
        self.markers.append(name)


def test_a_test_outside_the_tier_folders_or_marked_as_another_tier_stops_the_run() -> None:
    fine = _Item(TESTS / "e2e" / "test_fine.py", "slow")
    mark_tiers([fine])  # type: ignore[list-item]
    assert fine.markers == ["slow", "e2e"]

    stray = _Item(TESTS / "test_stray.py")
    leaking = _Item(TESTS / "unit" / "test_leak.py", "integration")
    with pytest.raises(pytest.UsageError) as refused:
        mark_tiers([_Item(TESTS / "unit" / "test_ok.py"), stray, leaking])  # type: ignore[list-item]
    lines = str(refused.value).splitlines()[1:]
    assert [line.strip() for line in lines] == [
        "tests/test_stray.py::test_it: not under tests/{unit,integration,e2e,install}/",
        "tests/unit/test_leak.py::test_it: in tests/unit/ but marked integration",
    ]


# A skip that names a server: redis-server, the S3 (moto) server. A missing server must fail
# the test (tests/support/redis_server.py and s3_server.py raise), never skip it.
_SERVER_SKIP = re.compile(r"(skip|skipif|importorskip)\b.*(redis|moto|\bs3\b|server)", re.I)


def test_no_test_skips_because_a_server_is_missing() -> None:
    offenders = [
        f"{path.relative_to(TESTS.parent)}:{number}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "pytest." in line and _SERVER_SKIP.search(line)
    ]
    assert offenders == []


def test_unit_tests_start_no_server() -> None:
    servers = re.compile(r"^from tests\.support\.(redis_server|s3_server) import", re.M)
    starting = {
        path.name for path in (TESTS / "unit").rglob("*.py") if servers.search(path.read_text())
    }
    assert starting == set()
