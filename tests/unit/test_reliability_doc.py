"""docs/reliability.md is generated from the tests' observations: it must list exactly the
declared scenarios, and every declared scenario must be observed by some test."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.reliability import ROOT, SCENARIOS, Observation
from tests.support.reliability_report import render

DOC = ROOT / "docs" / "reliability.md"


def _rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| scenario ", "|---")):
            rows.append([cell.strip().replace("\\|", "|") for cell in line.strip("|").split(" | ")])
    return rows


def test_the_page_lists_exactly_the_declared_scenarios() -> None:
    rows = _rows(DOC.read_text())
    declared = [(s.title, s.expected) for s in SCENARIOS.values()]
    assert sorted((r[0], r[1]) for r in rows) == sorted(declared), (
        "docs/reliability.md is stale: run the tests, then `make reliability-doc`"
    )
    assert all(r[-1] == "passed" for r in rows), [r[0] for r in rows if r[-1] != "passed"]


def test_every_declared_scenario_is_observed_by_a_test() -> None:
    sources = "\n".join(p.read_text() for p in Path(ROOT / "tests").rglob("test_*.py"))
    observed = set(re.findall(r'observe\(\s*"([a-z0-9_.]+)"', sources)) | set(
        re.findall(r'"((?:image|ref|msg|model|cache|fault|load)\.[a-z0-9_]+)"', sources)
    )
    assert set(SCENARIOS) <= observed, sorted(set(SCENARIOS) - observed)


def test_a_scenario_the_run_did_not_reach_shows_as_not_run() -> None:
    first = next(iter(SCENARIOS))
    text = render([Observation(first, "seen", sent=3, received=3, outcome="passed")], "now")
    rows = {r[0]: r for r in _rows(text)}
    assert rows[SCENARIOS[first].title][2:] == ["seen", "3", "3", "0", "0", "passed"]
    others = [s.title for k, s in SCENARIOS.items() if k != first]
    assert all(rows[title][2] == "not run" for title in others)
