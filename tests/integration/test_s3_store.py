"""S3Store and S3Quarantine against a real S3-compatible server (moto in server mode).

Every test makes its own buckets, so a test that restarts the server (moto forgets
everything) leaves nothing behind that another test relies on.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.support.s3_server import CREDENTIALS, S3Server
from worker.errors import (
    ConfigError,
    ForbiddenReference,
    ImageTooLarge,
    InvalidReference,
    ObjectNotFound,
    SourceChanged,
    StorageUnavailable,
)
from worker.quarantine import S3Quarantine
from worker.storage.s3 import S3Location, S3Store, create_s3_client, parse_s3_ref, s3_ref

SCORED = b"\xff\xd8\xff\xe0 the bytes that were scored " + bytes(range(256)) * 64
OTHER = b"\x89PNG\r\n\x1a\n a different upload under the same key " + bytes(range(256)) * 16
SHA = hashlib.sha256(SCORED).hexdigest()
RECORD = {
    "request_id": "req-42",
    "verdict": "block",
    "nsfw_score": 0.9731,
    "scores": {"nsfw": 0.9731, "sfw": 0.0269},
    "model": {"id": "opennsfw", "revision": "1.1", "runtime": "onnx", "precision": "fp32"},
}


# --- references (no server) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("s3://images/a.jpg", S3Location("images", "a.jpg")),
        ("s3://images/a%20b/%C3%BC.jpg", S3Location("images", "a b/ü.jpg")),
        ("s3://images/a b/ü.jpg", S3Location("images", "a b/ü.jpg")),
        ("s3://images/x%3Fy#1.jpg", S3Location("images", "x?y#1.jpg")),
        ("s3://images/50%.jpg", S3Location("images", "50%.jpg")),
        ("s3://images//lead", S3Location("images", "/lead")),
        ("s3://images/k.jpg?versionId=3%2Fx.y", S3Location("images", "k.jpg", "3/x.y")),
        ("S3://images/k", S3Location("images", "k")),
    ],
)
def test_parse_s3_ref(ref: str, expected: S3Location) -> None:
    assert parse_s3_ref(ref) == expected


@pytest.mark.parametrize(
    "ref",
    [
        "s3://images",
        "s3://images/",
        "s3:///key",
        "s3://x/key",  # too short for a bucket
        "s3://user@images/key",
        "s3://images:9000/key",
        "s3://images/k?versionId=",
        "s3://images/k?versionId=1&acl",
        "s3://images/k?what",
        "s3://images/%ff.jpg",
        "s3://images/" + "k" * 1025,
        "https://images/k",
    ],
)
def test_bad_s3_refs_are_invalid(ref: str) -> None:
    with pytest.raises(InvalidReference):
        parse_s3_ref(ref)


@given(
    key=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=60),
    version=st.none() | st.text(st.characters(codec="ascii"), min_size=1, max_size=20),
)
def test_s3_ref_round_trips(key: str, version: str | None) -> None:
    assume(not any(segment in (".", "..") for segment in key.split("/")))  # refused: see unit
    assert parse_s3_ref(s3_ref("images", key, version)) == S3Location("images", key, version)


def test_empty_allowlist_allows_no_bucket() -> None:
    store = S3Store([])
    with pytest.raises(ForbiddenReference):
        store.read("s3://images/a.jpg", 100)
    with pytest.raises(ForbiddenReference):
        next(store.iter_objects("images", ""))
    assert store._client is None  # refused before any client (or boto3) was needed


class _NoLengthClient:
    """A client whose GetObject answers without ContentLength: the cap must hold while
    streaming."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def get_object(self, **_: str) -> dict[str, Any]:
        return {"Body": io.BytesIO(self.data)}


def test_byte_cap_without_content_length() -> None:
    store = S3Store(["images"], client=_NoLengthClient(SCORED))
    assert store.read("s3://images/a.jpg", len(SCORED)) == SCORED
    with pytest.raises(ImageTooLarge):
        store.read("s3://images/a.jpg", len(SCORED) - 1)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def server(s3_moto: S3Server) -> S3Server:
    s3_moto.start()  # a no-op unless an earlier test left it stopped
    return s3_moto


@pytest.fixture
def admin(server: S3Server) -> Any:
    return server.admin


@pytest.fixture
def new_bucket(server: S3Server) -> Callable[..., str]:
    def make(kind: str = "src", versioned: bool = False) -> str:
        return server.create_bucket(f"{kind}-{uuid.uuid4().hex[:12]}", versioned)

    return make


@pytest.fixture
def bucket(new_bucket: Callable[..., str]) -> str:
    return new_bucket()


@pytest.fixture
def versioned(new_bucket: Callable[..., str]) -> str:
    return new_bucket("ver", versioned=True)


@pytest.fixture
def store(server: S3Server, bucket: str, versioned: str) -> S3Store:
    client = create_s3_client(server.endpoint_url, **CREDENTIALS)
    return S3Store([bucket, versioned], server.endpoint_url, client=client)


@pytest.fixture
def vault(new_bucket: Callable[..., str]) -> str:
    """The quarantine bucket: operator configuration, not an allowed source bucket."""
    return new_bucket("vault")


def _calls(client: Any, operation: str) -> list[dict[str, Any]]:
    """Record the parameters of every ``operation`` call the client makes from now on."""
    seen: list[dict[str, Any]] = []
    client.meta.events.register(
        f"provide-client-params.s3.{operation}", lambda params, **_: seen.append(params)
    )
    return seen


# --- S3Store ------------------------------------------------------------------------------------


def test_read(store: S3Store, admin: Any, bucket: str) -> None:
    key = "photos/a b/ü #1.jpg"
    admin.put_object(Bucket=bucket, Key=key, Body=SCORED)
    assert store.read(s3_ref(bucket, key), len(SCORED)) == SCORED
    assert store.read(f"s3://{bucket}/{key}", len(SCORED)) == SCORED  # written as is


def test_versioned_read(store: S3Store, admin: Any, versioned: str) -> None:
    first = admin.put_object(Bucket=versioned, Key="k.jpg", Body=SCORED)["VersionId"]
    admin.put_object(Bucket=versioned, Key="k.jpg", Body=OTHER)
    assert store.read(s3_ref(versioned, "k.jpg", first), 1 << 20) == SCORED
    assert store.read(s3_ref(versioned, "k.jpg"), 1 << 20) == OTHER


def test_not_found(store: S3Store, server: S3Server, admin: Any, versioned: str) -> None:
    admin.put_object(Bucket=versioned, Key="k.jpg", Body=SCORED)
    missing = [
        s3_ref(versioned, "missing.jpg"),
        s3_ref(versioned, "k.jpg", "no-such-version"),
    ]
    for ref in missing:
        with pytest.raises(ObjectNotFound, match="s3://"):
            store.read(ref, 1 << 20)
    never_made = S3Store(["gone-bucket"], client=server.client())
    with pytest.raises(ObjectNotFound):
        never_made.read("s3://gone-bucket/a.jpg", 1 << 20)


def test_bucket_outside_the_allowlist_is_forbidden(
    store: S3Store, admin: Any, new_bucket: Callable[..., str]
) -> None:
    other = new_bucket("other")
    admin.put_object(Bucket=other, Key="secret.jpg", Body=SCORED)
    with pytest.raises(ForbiddenReference) as info:
        store.read(s3_ref(other, "secret.jpg"), 1 << 20)
    assert info.value.code == "forbidden_reference"


def test_byte_cap(store: S3Store, admin: Any, bucket: str) -> None:
    admin.put_object(Bucket=bucket, Key="big.jpg", Body=SCORED)
    ref = s3_ref(bucket, "big.jpg")
    assert store.read(ref, len(SCORED)) == SCORED
    with pytest.raises(ImageTooLarge, match="over"):
        store.read(ref, len(SCORED) - 1)


def test_stopped_server_is_retryable(server: S3Server, admin: Any, store: S3Store) -> None:
    server.stop()
    try:
        with pytest.raises(StorageUnavailable) as info:
            store.read("s3://" + next(iter(store.allowed_buckets)) + "/a.jpg", 1 << 20)
        assert info.value.retryable
        with pytest.raises(StorageUnavailable):
            list(store.iter_objects(next(iter(store.allowed_buckets)), ""))
    finally:
        server.start()
    # Back on the same port (and empty): the same store works again.
    bucket = server.create_bucket(sorted(store.allowed_buckets)[0])
    admin.put_object(Bucket=bucket, Key="a.jpg", Body=SCORED)
    assert store.read(s3_ref(bucket, "a.jpg"), 1 << 20) == SCORED


def test_iter_objects_pages_through_more_than_a_thousand_keys(
    store: S3Store, admin: Any, bucket: str
) -> None:
    keys = [f"batch/{n:04d}.jpg" for n in range(1005)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: admin.put_object(Bucket=bucket, Key=key, Body=b"x"), keys))
    admin.put_object(Bucket=bucket, Key="batch/folder/", Body=b"")  # a folder placeholder
    admin.put_object(Bucket=bucket, Key="batch/odd ü?#%41.jpg", Body=b"x")
    admin.put_object(Bucket=bucket, Key="elsewhere.jpg", Body=b"x")
    listed = _calls(store.client, "ListObjectsV2")

    refs = list(store.iter_objects(bucket, "batch/"))

    assert len(listed) == 2  # S3 pages at 1000 keys
    assert [parse_s3_ref(ref).key for ref in refs] == [*keys, "batch/odd ü?#%41.jpg"]
    assert store.read(refs[-1], 10) == b"x"
    assert len(list(store.iter_objects(bucket, "batch/", page_size=400))) == 1006


# --- S3Quarantine -------------------------------------------------------------------------------


def _head(admin: Any, location: str) -> dict[str, Any]:
    where = parse_s3_ref(location)
    return dict(admin.head_object(Bucket=where.bucket, Key=where.key))


def _body(admin: Any, location: str) -> bytes:
    where = parse_s3_ref(location)
    return bytes(admin.get_object(**where.object_args())["Body"].read())


def _exists(admin: Any, bucket: str, key: str) -> bool:
    return int(admin.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0)) > 0


def test_move(store: S3Store, admin: Any, bucket: str, vault: str) -> None:
    key = "uploads/a b.jpg"
    admin.put_object(
        Bucket=bucket, Key=key, Body=SCORED, ContentType="image/jpeg", Metadata={"owner": "u1"}
    )
    ref = s3_ref(bucket, key)

    location = S3Quarantine(store, f"s3://{vault}/held", "move").apply(ref, SHA, RECORD)

    assert location == s3_ref(vault, f"held/{SHA[:16]}-a b.jpg")
    assert _body(admin, location) == SCORED
    head = _head(admin, location)
    assert head["ContentType"] == "image/jpeg"
    assert head["Metadata"] == {
        "owner": "u1",
        "modq-verdict": "block",
        "modq-nsfw-score": "0.973100",
        "modq-request-id": "req-42",
        "modq-model": "opennsfw@1.1",
        "modq-sha256": SHA,
        "modq-source": ref,
        "modq-source-etag": head["Metadata"]["modq-source-etag"],
    }
    record = json.loads(_body(admin, location + ".json"))
    assert record["scores"] == RECORD["scores"]
    assert (record["source"], record["sha256"], record["action"]) == (ref, SHA, "move")
    assert not _exists(admin, bucket, key)


def test_copy_keeps_the_source(store: S3Store, admin: Any, bucket: str, vault: str) -> None:
    admin.put_object(Bucket=bucket, Key="a.jpg", Body=SCORED)
    ref = s3_ref(bucket, "a.jpg")
    quarantine = S3Quarantine(store, f"s3://{vault}/", "copy")
    location = quarantine.apply(ref, SHA, RECORD)
    assert location == s3_ref(vault, f"{SHA[:16]}-a.jpg")
    assert _body(admin, location) == SCORED
    assert _body(admin, ref) == SCORED
    assert quarantine.apply(ref, SHA, RECORD) == location  # again: nothing changes


def test_tag_merges_with_existing_tags(store: S3Store, admin: Any, versioned: str) -> None:
    version = admin.put_object(
        Bucket=versioned, Key="a.jpg", Body=SCORED, Tagging="team=photos&stage=raw"
    )["VersionId"]
    ref = s3_ref(versioned, "a.jpg")

    location = S3Quarantine(store, "s3://unused-vault/", "tag").apply(ref, SHA, RECORD)

    assert location == s3_ref(versioned, "a.jpg", version)  # the exact version scored
    tags = admin.get_object_tagging(Bucket=versioned, Key="a.jpg", VersionId=version)["TagSet"]
    assert {tag["Key"]: tag["Value"] for tag in tags} == {
        "team": "photos",
        "stage": "raw",
        "modq-verdict": "block",
        "modq-score": "0.973100",
        "modq-request": "req-42",
    }
    assert _body(admin, ref) == SCORED


def test_tag_keeps_within_ten_tags(store: S3Store, admin: Any, bucket: str) -> None:
    admin.put_object(Bucket=bucket, Key="a.jpg", Body=SCORED)
    foreign = [{"Key": f"k{n}", "Value": "v"} for n in range(9)]
    admin.put_object_tagging(Bucket=bucket, Key="a.jpg", Tagging={"TagSet": foreign})
    quarantine = S3Quarantine(store, "s3://unused-vault/", "tag")
    quarantine.apply(s3_ref(bucket, "a.jpg"), SHA, RECORD)
    tags = admin.get_object_tagging(Bucket=bucket, Key="a.jpg")["TagSet"]
    assert len(tags) == 10 and {"Key": "modq-verdict", "Value": "block"} in tags

    full = [{"Key": f"k{n}", "Value": "v"} for n in range(10)]
    admin.put_object_tagging(Bucket=bucket, Key="a.jpg", Tagging={"TagSet": full})
    with pytest.raises(InvalidReference, match="no room"):
        quarantine.apply(s3_ref(bucket, "a.jpg"), SHA, RECORD)


def test_tag_refuses_changed_bytes(store: S3Store, admin: Any, bucket: str) -> None:
    admin.put_object(Bucket=bucket, Key="a.jpg", Body=OTHER)
    with pytest.raises(SourceChanged):
        S3Quarantine(store, "s3://unused-vault/", "tag").apply(s3_ref(bucket, "a.jpg"), SHA, RECORD)
    assert admin.get_object_tagging(Bucket=bucket, Key="a.jpg")["TagSet"] == []


def test_move_of_a_version(store: S3Store, admin: Any, versioned: str, vault: str) -> None:
    scored = admin.put_object(Bucket=versioned, Key="k.jpg", Body=SCORED)["VersionId"]
    newer = admin.put_object(Bucket=versioned, Key="k.jpg", Body=OTHER)["VersionId"]
    quarantine = S3Quarantine(store, f"s3://{vault}/q/", "move")

    location = quarantine.apply(s3_ref(versioned, "k.jpg", scored), SHA, RECORD)

    assert _body(admin, location) == SCORED
    listing = admin.list_object_versions(Bucket=versioned, Prefix="k.jpg")
    assert [v["VersionId"] for v in listing["Versions"]] == [newer]  # scored one gone for good
    assert "DeleteMarkers" not in listing
    assert _body(admin, s3_ref(versioned, "k.jpg")) == OTHER


def test_move_in_a_versioned_bucket_leaves_no_copy_behind(
    store: S3Store, admin: Any, versioned: str, vault: str
) -> None:
    admin.put_object(Bucket=versioned, Key="k.jpg", Body=SCORED)
    S3Quarantine(store, f"s3://{vault}/", "move").apply(s3_ref(versioned, "k.jpg"), SHA, RECORD)
    listing = admin.list_object_versions(Bucket=versioned, Prefix="k.jpg")
    assert "Versions" not in listing and "DeleteMarkers" not in listing


class _CrashBeforeDelete(S3Quarantine):
    def _delete_source(self, source: S3Location, sha256: str) -> None:
        raise RuntimeError("the worker died here")


def test_rerun_after_a_crash_between_copy_and_delete(
    store: S3Store, admin: Any, bucket: str, vault: str
) -> None:
    admin.put_object(Bucket=bucket, Key="a.jpg", Body=SCORED)
    ref, destination = s3_ref(bucket, "a.jpg"), f"s3://{vault}/"
    with pytest.raises(RuntimeError):
        _CrashBeforeDelete(store, destination, "move").apply(ref, SHA, RECORD)
    assert _body(admin, ref) == SCORED  # still in both places
    copies = _calls(store.client, "CopyObject")

    location = S3Quarantine(store, destination, "move").apply(ref, SHA, RECORD)

    assert copies == []  # the verified copy was reused
    assert _body(admin, location) == SCORED
    assert not _exists(admin, bucket, "a.jpg")
    assert S3Quarantine(store, destination, "move").apply(ref, SHA, RECORD) == location


def test_source_replaced_after_copy_is_not_deleted(
    store: S3Store, admin: Any, bucket: str, vault: str
) -> None:
    admin.put_object(Bucket=bucket, Key="a.jpg", Body=SCORED)
    ref, destination = s3_ref(bucket, "a.jpg"), f"s3://{vault}/"
    with pytest.raises(RuntimeError):
        _CrashBeforeDelete(store, destination, "move").apply(ref, SHA, RECORD)
    admin.put_object(Bucket=bucket, Key="a.jpg", Body=OTHER)  # a new upload takes the key

    with pytest.raises(SourceChanged) as info:
        S3Quarantine(store, destination, "move").apply(ref, SHA, RECORD)

    assert info.value.code == "source_changed"
    assert _body(admin, ref) == OTHER
    assert _body(admin, s3_ref(vault, f"{SHA[:16]}-a.jpg")) == SCORED


def test_source_changed_before_copy_leaves_no_target(
    store: S3Store, admin: Any, bucket: str, vault: str
) -> None:
    admin.put_object(Bucket=bucket, Key="a.jpg", Body=OTHER)
    with pytest.raises(SourceChanged):
        S3Quarantine(store, f"s3://{vault}/", "move").apply(s3_ref(bucket, "a.jpg"), SHA, RECORD)
    assert _body(admin, s3_ref(bucket, "a.jpg")) == OTHER
    assert admin.list_objects_v2(Bucket=vault).get("KeyCount", 0) == 0


def test_missing_quarantine_bucket_is_a_config_error(
    store: S3Store, admin: Any, bucket: str
) -> None:
    admin.put_object(Bucket=bucket, Key="a.jpg", Body=SCORED)
    with pytest.raises(ConfigError, match="no-such-vault"):
        S3Quarantine(store, "s3://no-such-vault/", "move").apply(
            s3_ref(bucket, "a.jpg"), SHA, RECORD
        )
    assert _body(admin, s3_ref(bucket, "a.jpg")) == SCORED


def test_gone_source_without_a_copy_is_not_found(store: S3Store, bucket: str, vault: str) -> None:
    with pytest.raises(ObjectNotFound):
        S3Quarantine(store, f"s3://{vault}/", "move").apply(s3_ref(bucket, "a.jpg"), SHA, RECORD)


def test_source_outside_the_allowlist_is_forbidden(store: S3Store, admin: Any, vault: str) -> None:
    admin.put_object(Bucket=vault, Key="a.jpg", Body=SCORED)
    with pytest.raises(ForbiddenReference):
        S3Quarantine(store, f"s3://{vault}/q/", "move").apply(s3_ref(vault, "a.jpg"), SHA, RECORD)
    assert _body(admin, s3_ref(vault, "a.jpg")) == SCORED


def test_a_concurrent_delivery_that_finished_the_move_first_is_not_reported_missing(
    store: S3Store, admin: Any, bucket: str, vault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two deliveries of one request at once: the second looked for a verified copy before
    the first made one, and reaches the source after the first deleted it."""
    admin.put_object(Bucket=bucket, Key="a.jpg", Body=SCORED)
    ref = s3_ref(bucket, "a.jpg")
    quarantine = S3Quarantine(store, f"s3://{vault}/", "move")
    first = quarantine.apply(ref, SHA, RECORD)
    verified = quarantine._verified
    stale = [False]  # the second delivery's first look, taken before the copy existed
    monkeypatch.setattr(
        quarantine, "_verified", lambda t, s: stale.pop() if stale else verified(t, s)
    )
    assert quarantine.apply(ref, SHA, RECORD) == first
    assert stale == [] and _body(admin, first) == SCORED and not _exists(admin, bucket, "a.jpg")
