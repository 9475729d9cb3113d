"""LocalStore confinement and limits; LocalQuarantine moves that never lose a file; building
the configured quarantine."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from worker.config import Settings
from worker.errors import (
    ConfigError,
    ForbiddenReference,
    ImageTooLarge,
    InvalidReference,
    ObjectNotFound,
    SourceChanged,
)
from worker.quarantine import LocalQuarantine, S3Quarantine, build_quarantine
from worker.storage import LocalStore, MemoryStore, build_store, file_ref, ref_to_path

SCORED = b"\xff\xd8\xff\xe0 the bytes that were scored " + bytes(range(256)) * 64
OTHER = b"\x89PNG\r\n\x1a\n a different upload under the same name " + bytes(range(256)) * 16


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    (path / "sub").mkdir(parents=True)
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "secret.jpg"
    path.parent.mkdir()
    path.write_bytes(b"secret bytes")
    return path


# --- LocalStore -------------------------------------------------------------------------------


def test_reads_a_file_under_the_root(root: Path) -> None:
    path = root / "sub" / "a b%.jpg"  # needs quoting in a URL
    path.write_bytes(SCORED)
    store = LocalStore([root])
    ref = file_ref(path)
    assert ref.startswith("file://")
    assert ref_to_path(ref) == path
    assert store.read(ref, max_bytes=len(SCORED)) == SCORED


def test_dotdot_escape_is_forbidden(root: Path, outside: Path) -> None:
    store = LocalStore([root])
    sneaky = root / "sub" / ".." / ".." / "outside" / outside.name
    assert sneaky.exists()
    with pytest.raises(ForbiddenReference) as info:
        store.read(file_ref(sneaky), 1 << 20)
    assert info.value.code == "forbidden_reference"
    # Spelled by hand too, without going through file_ref.
    with pytest.raises(ForbiddenReference):
        store.read(f"file://{root}/../outside/{outside.name}", 1 << 20)


def test_absolute_path_outside_roots_is_forbidden(root: Path, outside: Path) -> None:
    with pytest.raises(ForbiddenReference):
        LocalStore([root]).read(file_ref(outside), 1 << 20)


def test_sibling_with_the_root_as_name_prefix_is_forbidden(root: Path) -> None:
    sibling = root.parent / (root.name + "2") / "x.jpg"
    sibling.parent.mkdir()
    sibling.write_bytes(SCORED)
    with pytest.raises(ForbiddenReference):
        LocalStore([root]).read(file_ref(sibling), 1 << 20)


def test_symlink_pointing_outside_is_forbidden(root: Path, outside: Path) -> None:
    link = root / "sub" / "innocent.jpg"
    link.symlink_to(outside)
    assert link.read_bytes() == b"secret bytes"
    with pytest.raises(ForbiddenReference):
        LocalStore([root]).read(file_ref(link), 1 << 20)


def test_symlinked_directory_pointing_outside_is_forbidden(root: Path, outside: Path) -> None:
    (root / "linked").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(ForbiddenReference):
        LocalStore([root]).read(file_ref(root / "linked" / outside.name), 1 << 20)


def test_symlink_inside_the_root_is_allowed(root: Path) -> None:
    target = root / "sub" / "real.jpg"
    target.write_bytes(SCORED)
    (root / "alias.jpg").symlink_to(target)
    assert LocalStore([root]).read(file_ref(root / "alias.jpg"), 1 << 20) == SCORED


def test_any_of_several_roots(root: Path, outside: Path) -> None:
    store = LocalStore([root, outside.parent])
    assert store.read(file_ref(outside), 1 << 20) == b"secret bytes"


def test_missing_file_is_not_found(root: Path) -> None:
    with pytest.raises(ObjectNotFound) as info:
        LocalStore([root]).read(file_ref(root / "sub" / "missing.jpg"), 1 << 20)
    assert info.value.code == "not_found"


def test_directory_is_not_found(root: Path) -> None:
    with pytest.raises(ObjectNotFound):
        LocalStore([root]).read(file_ref(root / "sub"), 1 << 20)


def test_max_bytes(root: Path) -> None:
    path = root / "big.jpg"
    path.write_bytes(SCORED)
    store = LocalStore([root])
    assert store.read(file_ref(path), len(SCORED)) == SCORED
    with pytest.raises(ImageTooLarge) as info:
        store.read(file_ref(path), len(SCORED) - 1)
    assert info.value.code == "image_too_large"


@pytest.mark.parametrize(
    "ref", ["s3://bucket/key.jpg", "https://example.com/a.jpg", "file://host/a"]
)
def test_non_local_reference_is_invalid(root: Path, ref: str) -> None:
    with pytest.raises(InvalidReference):
        LocalStore([root]).read(ref, 1 << 20)


def test_memory_store() -> None:
    store = MemoryStore({"mem://a": SCORED})
    assert store.read("mem://a", len(SCORED)) == SCORED
    with pytest.raises(ImageTooLarge):
        store.read("mem://a", len(SCORED) - 1)
    with pytest.raises(ObjectNotFound):
        store.read("mem://b", 10)


# --- LocalQuarantine ---------------------------------------------------------------------------


@pytest.fixture
def source(root: Path) -> Path:
    path = root / "sub" / "upload.jpg"
    path.write_bytes(SCORED)
    return path


@pytest.fixture
def quarantine(root: Path, tmp_path: Path) -> LocalQuarantine:
    return LocalQuarantine(tmp_path / "quarantine", LocalStore([root]))


def _copy_step(quarantine: LocalQuarantine, source: Path, target: Path, sha: str) -> None:
    """The move's first step alone, as a crash right after it would leave things."""
    with quarantine.store.locate(file_ref(source)) as found:
        quarantine._place_copy(found, target, sha)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def test_move(source: Path, quarantine: LocalQuarantine) -> None:
    ref = file_ref(source)
    location = Path(quarantine.apply(ref, _sha(SCORED), {"verdict": "block", "nsfw_score": 0.97}))
    assert not source.exists()
    assert location.parent == quarantine.destination
    assert location.read_bytes() == SCORED
    record = json.loads(location.with_name(location.name + ".json").read_text())
    assert record["source"] == ref
    assert record["sha256"] == _sha(SCORED)
    assert record["verdict"] == "block"
    assert record["nsfw_score"] == 0.97
    assert _leftovers(quarantine.destination) == []


def test_move_twice_is_idempotent(source: Path, quarantine: LocalQuarantine) -> None:
    ref, sha = file_ref(source), _sha(SCORED)
    first = quarantine.apply(ref, sha, {"verdict": "block"})
    second = quarantine.apply(ref, sha, {"verdict": "block"})
    assert first == second
    assert Path(second).read_bytes() == SCORED
    assert not source.exists()


def test_crash_after_copy_is_finished_by_the_next_move(
    source: Path, quarantine: LocalQuarantine
) -> None:
    sha = _sha(SCORED)
    target = quarantine.target_for(source, sha)
    quarantine.destination.mkdir(parents=True)
    _copy_step(quarantine, source, target, sha)  # the first step, then "crash"
    assert source.exists() and target.read_bytes() == SCORED
    location = quarantine.apply(file_ref(source), sha, {"verdict": "block"})
    assert Path(location) == target
    assert not source.exists()
    assert target.read_bytes() == SCORED
    assert target.with_name(target.name + ".json").is_file()


def test_crash_after_record_is_finished_by_the_next_move(
    source: Path, quarantine: LocalQuarantine
) -> None:
    # A verified copy and its record are in place (placed by hand); the source is still there.
    sha = _sha(SCORED)
    target = quarantine.target_for(source, sha)
    quarantine.destination.mkdir(parents=True)
    target.write_bytes(SCORED)
    target.with_name(target.name + ".json").write_text("{}")
    quarantine.apply(file_ref(source), sha, {"verdict": "block"})
    assert not source.exists()
    assert target.read_bytes() == SCORED
    assert json.loads(target.with_name(target.name + ".json").read_text())["sha256"] == sha


def test_crash_before_copy_leftover_partial_is_recovered(
    source: Path, quarantine: LocalQuarantine
) -> None:
    sha = _sha(SCORED)
    target = quarantine.target_for(source, sha)
    quarantine.destination.mkdir(parents=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(SCORED[: len(SCORED) // 3])  # a copy cut short by the crash
    quarantine.apply(file_ref(source), sha, {"verdict": "block"})
    assert target.read_bytes() == SCORED
    assert not source.exists()
    assert _leftovers(quarantine.destination) == []


def test_stale_unverified_target_is_replaced(source: Path, quarantine: LocalQuarantine) -> None:
    sha = _sha(SCORED)
    target = quarantine.target_for(source, sha)
    quarantine.destination.mkdir(parents=True)
    target.write_bytes(b"garbage left by something else")
    quarantine.apply(file_ref(source), sha, {"verdict": "block"})
    assert target.read_bytes() == SCORED
    assert not source.exists()


def test_source_changed_since_scoring_is_left_in_place(
    source: Path, quarantine: LocalQuarantine
) -> None:
    scored_sha = _sha(SCORED)
    source.write_bytes(OTHER)  # replaced after it was scored
    with pytest.raises(SourceChanged) as info:
        quarantine.apply(file_ref(source), scored_sha, {"verdict": "block"})
    assert info.value.code == "source_changed"
    assert source.read_bytes() == OTHER
    target = quarantine.target_for(source, scored_sha)
    assert not target.exists()
    assert not target.with_name(target.name + ".json").exists()
    assert _leftovers(quarantine.destination) == []


def test_source_replaced_after_copy_is_not_deleted(
    source: Path, quarantine: LocalQuarantine
) -> None:
    sha = _sha(SCORED)
    target = quarantine.target_for(source, sha)
    quarantine.destination.mkdir(parents=True)
    _copy_step(quarantine, source, target, sha)  # crash after the copy …
    replacement = source.with_name("new-upload.tmp")
    replacement.write_bytes(OTHER)
    os.replace(replacement, source)  # … then a new upload takes the name
    with pytest.raises(SourceChanged):
        quarantine.apply(file_ref(source), sha, {"verdict": "block"})
    assert source.read_bytes() == OTHER  # the new upload is not deleted
    assert target.read_bytes() == SCORED  # and the scored bytes are safe


def test_source_rewritten_in_place_after_copy_keeps_scored_bytes(
    source: Path, quarantine: LocalQuarantine
) -> None:
    """The quarantined copy must not share storage with the source: a writer that rewrites
    the source in place (open 'wb') after the copy step must not change the quarantined bytes."""
    sha = _sha(SCORED)
    target = quarantine.target_for(source, sha)
    quarantine.destination.mkdir(parents=True)
    _copy_step(quarantine, source, target, sha)  # crash after the copy …
    with source.open("wb") as handle:  # … then the name is rewritten in place
        handle.write(OTHER)
    with pytest.raises(SourceChanged):
        quarantine.apply(file_ref(source), sha, {"verdict": "block"})
    assert source.read_bytes() == OTHER
    assert target.read_bytes() == SCORED, "the scored bytes were lost from quarantine"


def test_gone_source_without_copy_is_not_found(source: Path, quarantine: LocalQuarantine) -> None:
    sha = _sha(SCORED)
    source.unlink()
    with pytest.raises(ObjectNotFound):
        quarantine.apply(file_ref(source), sha, {"verdict": "block"})


def test_source_outside_roots_is_forbidden(outside: Path, quarantine: LocalQuarantine) -> None:
    with pytest.raises(ForbiddenReference):
        quarantine.apply(file_ref(outside), _sha(b"secret bytes"), {"verdict": "block"})
    assert outside.exists()


def test_quarantine_copy_is_its_own_file(source: Path, quarantine: LocalQuarantine) -> None:
    """Copy, not hard link: the quarantined bytes live in their own inode, so the move works
    the same across filesystems and nothing done to the source reaches them."""
    sha = _sha(SCORED)
    target = quarantine.target_for(source, sha)
    quarantine.destination.mkdir(parents=True)
    _copy_step(quarantine, source, target, sha)
    assert os.stat(target).st_ino != os.stat(source).st_ino
    assert os.stat(source).st_nlink == 1
    location = Path(quarantine.apply(file_ref(source), sha, {"verdict": "block"}))
    assert location.read_bytes() == SCORED
    assert not source.exists()
    assert _leftovers(quarantine.destination) == []


def test_copy_action_leaves_the_source(root: Path, source: Path, tmp_path: Path) -> None:
    quarantine = LocalQuarantine(tmp_path / "quarantine", LocalStore([root]), action="copy")
    ref, sha = file_ref(source), _sha(SCORED)
    location = Path(quarantine.apply(ref, sha, {"verdict": "block"}))
    assert location.read_bytes() == SCORED
    assert source.read_bytes() == SCORED
    record = json.loads(location.with_name(location.name + ".json").read_text())
    assert record["action"] == "copy"
    assert quarantine.apply(ref, sha, {"verdict": "block"}) == str(location)
    assert source.exists()


def test_tag_action_is_refused_for_local_files(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tag"):
        LocalQuarantine(tmp_path / "quarantine", LocalStore([root]), action="tag")


# --- build_quarantine --------------------------------------------------------------------------


def test_build_quarantine_from_settings(root: Path, tmp_path: Path) -> None:
    settings = Settings(allowed_roots=[str(root)], allowed_buckets=["images"])
    store = build_store(settings.storage, settings.http)
    assert build_quarantine(settings.storage, store) is None

    folder = tmp_path / "q"
    local = build_quarantine(
        settings.model_copy(update={"quarantine_uri": file_ref(folder)}).storage, store
    )
    assert isinstance(local, LocalQuarantine)
    assert local.destination == folder and local.action == "move"

    s3 = build_quarantine(
        settings.model_copy(
            update={"quarantine_uri": "s3://vault/held", "quarantine_action": "tag"}
        ).storage,
        store,
    )
    assert isinstance(s3, S3Quarantine)
    assert (s3.bucket, s3.prefix, s3.action) == ("vault", "held/", "tag")


@pytest.mark.parametrize(
    ("uri", "action"),
    [("ftp://host/dir", "move"), (file_ref(Path("/q")), "tag"), ("s3://vault/x?y=1", "copy")],
)
def test_build_quarantine_refuses_bad_settings(uri: str, action: str) -> None:
    settings = Settings(quarantine_uri=uri, quarantine_action=action)
    with pytest.raises(ConfigError):
        build_quarantine(settings.storage, build_store(settings.storage, settings.http))


def test_s3_quarantine_needs_an_s3_store(tmp_path: Path) -> None:
    settings = Settings(quarantine_uri="s3://vault/")
    with pytest.raises(ConfigError, match="s3://"):
        build_quarantine(settings.storage, LocalStore([tmp_path]))


def test_a_concurrent_delivery_that_finished_the_move_first_is_not_reported_missing(
    source: Path, quarantine: LocalQuarantine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two deliveries of one request at once: the second looked for a verified copy before
    the first made one, and reaches the source after the first deleted it."""
    ref, sha = file_ref(source), _sha(SCORED)
    first = quarantine.apply(ref, sha, {"verdict": "block"})  # the first delivery, in full
    verified = LocalQuarantine._verified
    stale = [False]  # the second delivery's first look, taken before the copy existed
    monkeypatch.setattr(
        LocalQuarantine,
        "_verified",
        staticmethod(lambda t, s: stale.pop() if stale else verified(t, s)),
    )
    assert quarantine.apply(ref, sha, {"verdict": "block"}) == first
    assert stale == [] and Path(first).read_bytes() == SCORED and not source.exists()
