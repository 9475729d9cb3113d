"""``s3://`` references that would leave their key: ``.`` and ``..`` segments are refused.

S3 itself takes ``../other/key`` as a literal key, but botocore sends the key in the request
path, and a proxy or an S3-compatible server that normalises paths resolves
``/allowed/../other/key`` to ``/other/key``: another bucket than the one the allowlist checked.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from worker.errors import InvalidReference
from worker.storage.s3 import S3Location, parse_s3_prefix, parse_s3_ref, s3_ref


@pytest.mark.parametrize(
    "ref",
    [
        "s3://allowed/../other/key",
        "s3://allowed/..",
        "s3://allowed/.",
        "s3://allowed/./key",
        "s3://allowed/a/../../other/key",
        "s3://allowed/a/./b.jpg",
        "s3://allowed/a/..",
        "s3://allowed//../key",
        "s3://allowed/%2E%2E/other/key",  # escapes are decoded before the check
        "s3://allowed/a%2F..%2Fb",
        "s3://allowed/../other/key?versionId=1",
    ],
)
def test_dot_segments_are_invalid(ref: str) -> None:
    with pytest.raises(InvalidReference, match="segment") as raised:
        parse_s3_ref(ref)
    assert raised.value.code == "invalid_reference"


@pytest.mark.parametrize("uri", ["s3://allowed/../other/", "s3://allowed/./", "s3://allowed/.."])
def test_dot_segments_in_a_prefix_are_invalid(uri: str) -> None:
    with pytest.raises(InvalidReference, match="segment"):
        parse_s3_prefix(uri)


@pytest.mark.parametrize(
    ("ref", "key"),
    [
        ("s3://allowed/a..b/c.jpg", "a..b/c.jpg"),
        ("s3://allowed/.hidden/x.jpg", ".hidden/x.jpg"),
        ("s3://allowed/a/.../b", "a/.../b"),
        ("s3://allowed/a/..b/c", "a/..b/c"),
        ("s3://allowed/photo.", "photo."),
        ("s3://allowed//lead", "/lead"),  # an empty segment is a key S3 keeps as written
    ],
)
def test_dots_inside_a_segment_are_part_of_the_key(ref: str, key: str) -> None:
    assert parse_s3_ref(ref) == S3Location("allowed", key)


@pytest.mark.parametrize("ref", ["s3:///key", "s3://../key", "s3://./key", "s3://a/key"])
def test_buckets_must_be_names(ref: str) -> None:
    with pytest.raises(InvalidReference, match="bucket name"):
        parse_s3_ref(ref)


def _dot_segment(key: str) -> bool:
    return any(segment in (".", "..") for segment in key.split("/"))


@given(
    key=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=60)
    | st.lists(st.sampled_from(["a", ".", "..", "", ".b", "c."]), min_size=1).map("/".join),
)
def test_a_key_round_trips_or_is_refused_for_its_dot_segments(key: str) -> None:
    assume(key)
    ref = s3_ref("allowed", key)
    if _dot_segment(key):
        with pytest.raises(InvalidReference):
            parse_s3_ref(ref)
    else:
        assert parse_s3_ref(ref) == S3Location("allowed", key)
