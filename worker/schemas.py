"""The wire contract as JSON Schema files, generated from the pydantic models."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from worker.messages import ModerationRequest, ModerationResult

__all__ = ["SCHEMAS", "render", "write_all"]

SCHEMAS: dict[str, type[BaseModel]] = {
    "moderation_request.v1.json": ModerationRequest,
    "moderation_result.v1.json": ModerationResult,
}


def render(model: type[BaseModel]) -> str:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in SCHEMAS.items():
        path = directory / name
        path.write_text(render(model))
        written.append(path)
    return written
