"""The committed JSON Schemas are exactly what the pydantic models generate, and they carry
every constraint of the request model that JSON Schema can state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis_jsonschema import from_schema
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from worker.messages import MAX_METADATA_BYTES, ModerationRequest
from worker.schemas import SCHEMAS, render

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_file_matches_model(name: str) -> None:
    committed = (SCHEMA_DIR / name).read_text()
    assert committed == render(SCHEMAS[name]), (
        f"schemas/{name} drifted from worker/messages.py: run `modq schemas export`"
    )


# -- a schema-valid request is a request the worker accepts --------------------------------

REQUEST_SCHEMA = json.loads((SCHEMA_DIR / "moderation_request.v1.json").read_text())


def _metadata_bytes(document: dict[str, Any]) -> int:
    metadata = document.get("metadata", {})
    return sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())


def test_the_schemas_are_valid_draft_2020_12() -> None:
    for name in SCHEMAS:
        Draft202012Validator.check_schema(json.loads((SCHEMA_DIR / name).read_text()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(from_schema(REQUEST_SCHEMA))
def test_requests_generated_from_the_schema_are_accepted(document: dict[str, Any]) -> None:
    """Over JSON, as a producer in any language sends them. The one rule JSON Schema cannot
    state, the metadata's total size in bytes, is the only refusal allowed."""
    try:
        ModerationRequest.model_validate_json(json.dumps(document))
    except ValidationError as exc:
        assert [error["loc"][0] for error in exc.errors()] == ["metadata"], exc
        assert _metadata_bytes(document) > MAX_METADATA_BYTES, exc


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image", "ftp://host/cat.jpg"),
        ("image", "s3://"),
        ("image", "s3://bucket[/key"),
        ("image", "https://host\uff0fcat.jpg"),
        ("image", "file:relative/cat.jpg"),
        ("callback", "celery://t?quene=results"),
        ("callback", "celery://t?queue="),
        ("callback", "celery:///t"),
        ("callback", "redis-stream://s?maxlen=1"),
        ("callback", "http://hooks.example.com/x"),
        ("callback", "https://user@hooks.example.com/x"),
        ("request_id", "a b"),
        ("metadata", {"k": "v" * (MAX_METADATA_BYTES + 1)}),
    ],
)
def test_the_schema_and_the_model_refuse_the_same_requests(field: str, value: Any) -> None:
    document = {"request_id": "r-1", "image": "file:///srv/cat.jpg", field: value}
    assert not Draft202012Validator(REQUEST_SCHEMA).is_valid(document)
    with pytest.raises(ValidationError):
        ModerationRequest.model_validate(document)
