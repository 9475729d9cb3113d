"""The request contract: what producers may send, and what is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.messages import ModerationRequest


def test_round_trip_through_json() -> None:
    request = ModerationRequest(
        request_id="upload-42",
        image="s3://uploads/2026/11/cat.jpg?versionId=abc",
        callback="celery://moderation.done?queue=results",
        metadata={"user": "7"},
    )
    again = ModerationRequest.model_validate_json(request.model_dump_json())
    assert again == request
    assert again.schema_version == 1


@pytest.mark.parametrize(
    "image",
    ["file:///srv/uploads/a.png", "https://cdn.example.com/a.jpg", "s3://bucket/key"],
)
def test_accepted_image_references(image: str) -> None:
    assert ModerationRequest(request_id="r1", image=image).image == image


@pytest.mark.parametrize(
    "image",
    ["ftp://host/a.jpg", "javascript:alert(1)", "/srv/uploads/a.png", "s3:///no-bucket", ""],
)
def test_refused_image_references(image: str) -> None:
    with pytest.raises(ValidationError):
        ModerationRequest(request_id="r1", image=image)


@pytest.mark.parametrize(
    "callback", ["celery://task.name?queue=q", "redis-stream://results", "https://hook.example/x"]
)
def test_accepted_callbacks(callback: str) -> None:
    assert ModerationRequest(request_id="r1", image="s3://b/k", callback=callback).callback


@pytest.mark.parametrize("callback", ["http://hook.example/x", "amqp://q", "celery://"])
def test_refused_callbacks(callback: str) -> None:
    with pytest.raises(ValidationError):
        ModerationRequest(request_id="r1", image="s3://b/k", callback=callback)


def test_missing_fields_and_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError):
        ModerationRequest.model_validate({"request_id": "r1"})
    with pytest.raises(ValidationError):
        ModerationRequest.model_validate({"request_id": "r1", "image": "s3://b/k", "x": 1})


def test_request_id_is_a_safe_key() -> None:
    for bad in ("", "a b", "../../etc", "x" * 129):
        with pytest.raises(ValidationError):
            ModerationRequest(request_id=bad, image="s3://b/k")


def test_oversized_metadata_is_refused() -> None:
    with pytest.raises(ValidationError, match="metadata"):
        ModerationRequest(request_id="r1", image="s3://b/k", metadata={"blob": "x" * 10_000_000})
