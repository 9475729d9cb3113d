"""The committed JSON Schemas are exactly what the pydantic models generate."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.schemas import SCHEMAS, render

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_file_matches_model(name: str) -> None:
    committed = (SCHEMA_DIR / name).read_text()
    assert committed == render(SCHEMAS[name]), (
        f"schemas/{name} drifted from worker/messages.py: run `modq schemas export`"
    )
