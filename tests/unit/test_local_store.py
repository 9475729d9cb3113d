"""LocalStore against hostile paths: special files refused without blocking, names that can
never be valid, symlinks inside and across roots, and a directory swapped for a symlink to
outside while reads run."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import Observe
from worker.errors import (
    ForbiddenReference,
    ImageTooLarge,
    InvalidReference,
    ModqError,
    ObjectNotFound,
)
from worker.quarantine import LocalQuarantine
from worker.storage import LocalStore, file_ref

INSIDE = b"\xff\xd8\xff\xe0 inside the root"
OUTSIDE = b"\xff\xd8\xff\xe0 OUTSIDE: must never be read"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "a.jpg").write_bytes(INSIDE)
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "a.jpg").write_bytes(OUTSIDE)
    return path


def _bounded(call: Callable[[], object], limit_s: float = 5.0) -> tuple[float, object]:
    """Run ``call`` in a thread: (seconds, result or error); fails if it blocks."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # the outcome is what the test looks at
            outcome.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), "the read blocked"
    return time.monotonic() - start, outcome[0]


# --- only regular files -------------------------------------------------------------------------


@pytest.fixture
def specials(root: Path) -> Iterator[dict[str, Path]]:
    fifo = root / "fifo.jpg"
    os.mkfifo(fifo)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock = root / "sock.jpg"
    listening.bind(str(sock))
    listening.listen(1)
    yield {"fifo": fifo, "socket": sock, "directory": root / "sub"}
    listening.close()


def test_fifos_sockets_devices_and_directories_are_refused_at_once(
    root: Path, specials: dict[str, Path], observe: Observe
) -> None:
    store = LocalStore([root])
    seen: dict[str, tuple[float, object]] = {}
    for kind, path in specials.items():
        seen[kind] = _bounded(lambda path=path: store.read(file_ref(path), 1 << 20))
    devices = LocalStore([Path("/dev")])
    for device in ("zero", "urandom", "null"):
        seen[f"/dev/{device}"] = _bounded(lambda d=device: devices.read(f"file:///dev/{d}", 64))
    # Through a symlink in the root: refused by confinement (it leaves the root) first.
    (root / "zero.jpg").symlink_to("/dev/zero")
    seen["link to /dev/zero"] = _bounded(lambda: store.read(file_ref(root / "zero.jpg"), 64))
    expected = {
        "fifo": ForbiddenReference,
        "socket": ForbiddenReference,
        "directory": ObjectNotFound,
        "/dev/zero": ForbiddenReference,
        "/dev/urandom": ForbiddenReference,
        "/dev/null": ForbiddenReference,
        "link to /dev/zero": ForbiddenReference,
    }
    for kind, (elapsed, outcome) in seen.items():
        assert isinstance(outcome, expected[kind]), (kind, outcome)
        assert not outcome.retryable
        assert elapsed < 1.0, (kind, elapsed)
    slowest = max(elapsed for elapsed, _ in seen.values())
    codes = {kind: getattr(outcome, "code", outcome) for kind, (_, outcome) in seen.items()}
    observe(
        "ref.file_special",
        f"{', '.join(f'{k} → `{c}`' for k, c in codes.items())}; slowest answer "
        f"{slowest * 1000:.1f} ms (nothing opened but the directories walked; a FIFO never "
        f"opened, so no writer is waited for); NUL bytes, a 256-byte name and a 4,096-byte "
        f"path → `invalid_reference` (test_names_that_can_never_be_valid_are_invalid)",
        sent=len(seen),
        received=len(seen),
    )


def test_a_fifo_swapped_in_after_the_check_does_not_block(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kind is checked before the open; should a FIFO take the name in between, the
    open itself (O_NONBLOCK) returns at once and the descriptor's kind refuses it."""
    fifo = root / "sub" / "late.jpg"
    (root / "sub" / "late.jpg").write_bytes(INSIDE)
    real_open = os.open

    def swapping_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if path == b"late.jpg":
            os.unlink(fifo)
            os.mkfifo(fifo)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", swapping_open)
    elapsed, outcome = _bounded(lambda: LocalStore([root]).read(file_ref(fifo), 64))
    assert isinstance(outcome, ForbiddenReference), outcome
    assert elapsed < 1.0


# --- names that cannot name a file ----------------------------------------------------------------


def test_names_that_can_never_be_valid_are_invalid(root: Path) -> None:
    store = LocalStore([root])
    base = "file://" + quote(str(root))
    (root / ("n" * 255)).write_bytes(INSIDE)  # the longest name there is: readable
    assert store.read(f"{base}/{'n' * 255}", 64) == INSIDE
    refs = {
        "encoded NUL": f"{base}/sub/a%00.jpg",
        "raw NUL": f"{base}/sub/a\x00.jpg",
        "NUL in a directory": f"{base}/s%00ub/a.jpg",
        "256-byte name": f"{base}/{'n' * 256}",
        "256-byte directory": f"{base}/{'d' * 256}/a.jpg",
        "4,096-byte path": f"{base}/" + "/".join(["d" * 200] * 21),
        "query": f"{base}/sub/a.jpg?x=1",
        "fragment": f"{base}/sub/a.jpg#x",
        "relative": "file:sub/a.jpg",
        "other host": f"file://elsewhere{quote(str(root))}/sub/a.jpg",
    }
    for what, ref in refs.items():
        with pytest.raises(InvalidReference) as info:
            store.read(ref, 64)
        assert info.value.code == "invalid_reference", what
        assert not info.value.retryable, what


def test_a_symlink_loop_is_invalid(root: Path) -> None:
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    (root / "self").symlink_to("self/x")
    for name in ("a", "self"):
        with pytest.raises(InvalidReference, match="symlinks"):
            LocalStore([root]).read(file_ref(root / name), 64)


def test_a_path_through_a_regular_file_is_not_found(root: Path) -> None:
    with pytest.raises(ObjectNotFound):
        LocalStore([root]).read(file_ref(root / "sub" / "a.jpg" / "x"), 64)
    with pytest.raises(ObjectNotFound):
        LocalStore([root]).read(file_ref(root / "sub") + "/", 64)


# --- `..` and symlinks inside the roots -----------------------------------------------------------


def test_dotdot_and_symlinks_that_stay_inside_the_roots_work(
    root: Path, outside: Path, tmp_path: Path
) -> None:
    store = LocalStore([root])
    base = "file://" + quote(str(root))
    (root / "rel").symlink_to("sub/a.jpg")
    (root / "abs").symlink_to(root / "sub" / "a.jpg")
    (root / "sub" / "up").symlink_to("../sub/./a.jpg")
    (root / "dirlink").symlink_to("sub", target_is_directory=True)
    (root / "chain").symlink_to("dirlink/../rel")
    readable = [
        f"{base}/sub/../sub/a.jpg",
        f"{base}/./sub//a.jpg",
        f"{base}/rel",
        f"{base}/abs",
        f"{base}/sub/up",
        f"{base}/dirlink/a.jpg",
        f"{base}/dirlink/../sub/a.jpg",
        f"{base}/chain",
    ]
    for ref in readable:
        assert store.read(ref, 64) == INSIDE, ref
    # A root configured through a symlink answers to both spellings.
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    aliased = LocalStore([alias])
    assert aliased.read(file_ref(alias / "sub" / "a.jpg"), 64) == INSIDE
    assert aliased.read(file_ref(root / "sub" / "a.jpg"), 64) == INSIDE
    # A link into another allowed root is followed there.
    (root / "across").symlink_to(outside / "sub" / "a.jpg")
    assert LocalStore([root, outside]).read(f"{base}/across", 64) == OUTSIDE


def test_dotdot_and_symlinks_that_leave_the_roots_are_forbidden(root: Path, outside: Path) -> None:
    store = LocalStore([root])
    base = "file://" + quote(str(root))
    (root / "up").symlink_to("../outside/sub/a.jpg")
    (root / "sub" / "upup").symlink_to("../../outside/sub/a.jpg")
    (root / "abs").symlink_to(outside / "sub" / "a.jpg")
    (root / "dir").symlink_to(outside / "sub", target_is_directory=True)
    (root / "slash").symlink_to("/")
    refs = [
        f"{base}/../outside/sub/a.jpg",
        f"{base}/sub/../../outside/sub/a.jpg",
        f"{base}/%2e%2e/outside/sub/a.jpg",
        f"{base}/up",
        f"{base}/sub/upup",
        f"{base}/abs",
        f"{base}/dir/a.jpg",
        f"{base}/slash{quote(str(outside))}/sub/a.jpg",
        "file://" + quote(str(outside)) + "/sub/a.jpg",
        "file://" + quote(str(root.parent)) + "/other/../root/sub/a.jpg",
    ]
    for ref in refs:
        with pytest.raises(ForbiddenReference):
            store.read(ref, 64)


# --- the race ---------------------------------------------------------------------------------


def _swapper(root: Path, outside: Path, stop: threading.Event, swaps: list[int]) -> None:
    """Swap ``root/sub`` for a symlink to ``outside/sub`` and back, as fast as possible."""
    real, parked = root / "sub", root / "parked"
    while not stop.is_set():
        os.rename(real, parked)
        os.symlink(outside / "sub", real)
        os.unlink(real)
        os.rename(parked, real)
        swaps[0] += 1


def test_a_directory_swapped_for_a_symlink_while_reading_never_leaks(
    root: Path, outside: Path, tmp_path: Path, observe: Observe
) -> None:
    store = LocalStore([root])
    quarantine = LocalQuarantine(tmp_path / "q", store, action="copy")
    ref = file_ref(root / "sub" / "a.jpg")
    stop, swaps = threading.Event(), [0]
    swapper = threading.Thread(target=_swapper, args=(root, outside, stop, swaps))
    swapper.start()
    outcomes: Counter[str] = Counter()
    leaked = 0
    start = time.monotonic()

    def running() -> bool:
        """3 s at least; on a busy machine, up to 15 s until both outcomes were seen."""
        elapsed = time.monotonic() - start
        both = outcomes["read"] > 0 and outcomes["forbidden_reference"] > 0
        return elapsed < 3.0 or (not both and elapsed < 15.0)

    try:
        while running():
            try:
                data = store.read(ref, 1 << 20)
            except ModqError as exc:
                outcomes[exc.code] += 1
                continue
            leaked += data == OUTSIDE
            outcomes["read"] += data == INSIDE
    finally:
        stop.set()
        swapper.join()
    ran = time.monotonic() - start
    assert leaked == 0
    assert outcomes["read"] > 0 and outcomes["forbidden_reference"] > 0, outcomes
    assert set(outcomes) <= {"read", "forbidden_reference", "not_found"}, outcomes
    # The quarantine copies through the same walk: a copy never holds the outside bytes.
    assert quarantine.apply(ref, _sha(INSIDE), {"verdict": "block"})
    assert all(
        path.read_bytes() == INSIDE for path in (tmp_path / "q").iterdir() if path.suffix == ".jpg"
    )
    observe(
        "ref.file_race",
        f"`root/sub` swapped for a symlink to `outside/sub` and back {swaps[0]} times while "
        f"{sum(outcomes.values())} reads ran for {ran:.1f} s: "
        f"{outcomes['read']} read the inside file, "
        f"{outcomes['forbidden_reference']} → `forbidden_reference`, "
        f"{outcomes['not_found']} → `not_found` (the instant the name was gone); "
        f"{leaked} returned the outside file's bytes",
        sent=sum(outcomes.values()),
        received=sum(outcomes.values()) - leaked,
        lost=leaked,
    )


def test_a_file_swapped_for_a_symlink_while_reading_never_leaks(root: Path, outside: Path) -> None:
    store = LocalStore([root])
    target = root / "sub" / "a.jpg"
    stop = threading.Event()

    def swap() -> None:
        parked = root / "sub" / "parked.jpg"
        while not stop.is_set():
            os.rename(target, parked)
            os.symlink(outside / "sub" / "a.jpg", target)
            os.unlink(target)
            os.rename(parked, target)

    swapper = threading.Thread(target=swap)
    swapper.start()
    seen: Counter[bytes | str] = Counter()
    start = time.monotonic()
    try:
        # 3,000 reads at least; on a busy machine, up to 15 s until one read the file.
        while sum(seen.values()) < 3000 or (not seen[INSIDE] and time.monotonic() - start < 15):
            try:
                seen[store.read(file_ref(target), 1 << 20)] += 1
            except ModqError as exc:
                seen[exc.code] += 1
    finally:
        stop.set()
        swapper.join()
    assert OUTSIDE not in seen
    assert seen[INSIDE] > 0, seen
    assert set(seen) <= {INSIDE, "forbidden_reference", "not_found"}, seen


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_reads_are_capped_exactly_and_see_a_file_that_grew(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore([root])
    exact, over = root / "exact.bin", root / "over.bin"
    exact.write_bytes(b"x" * 1000)
    over.write_bytes(b"x" * 1001)
    assert store.read(file_ref(exact), 1000) == b"x" * 1000
    with pytest.raises(ImageTooLarge):
        store.read(file_ref(over), 1000)
    # The size seen before reading is only a hint: a file that grew past it is read whole,
    # up to the cap, and one that grew past the cap is refused.
    import worker.storage.local as local

    real_fstat = os.fstat

    class Shrunk:
        def __init__(self, st: os.stat_result) -> None:
            self.st_size = 10
            self.st_mode, self.st_dev, self.st_ino = st.st_mode, st.st_dev, st.st_ino

    monkeypatch.setattr(local.os, "fstat", lambda fd: Shrunk(real_fstat(fd)))
    assert store.read(file_ref(exact), 1000) == b"x" * 1000
    with pytest.raises(ImageTooLarge):
        store.read(file_ref(over), 1000)
