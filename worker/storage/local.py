"""Local files, confined to allowed roots, opened without a window for swaps.

A ``file://`` path is never handed to the kernel whole. The walk starts from a directory
descriptor of the allowed root that the path names and opens one component at a time
relative to the one before (``openat`` with ``O_NOFOLLOW | O_DIRECTORY``), so no component
can be replaced by a symlink between a check and an open: what is opened is what was judged.

What a reference may name:

- ``file:///abs/path`` (host empty or ``localhost``; no query or fragment), percent-decoded
  to bytes. A NUL byte, a component over 255 bytes or a path over 4,095 bytes is
  ``invalid_reference``: it cannot name a file, now or on a retry.
- The path must start with an allowed root, spelled as configured or as its real path.
  ``.`` is skipped; ``..`` steps back to the directory the walk came from, never above the
  root (``forbidden_reference``), so ``root/sub/../a.jpg`` is ``root/a.jpg``.
- Symlinks inside the roots work, resolved by modq rather than the kernel: the link is read
  (``readlinkat``), a relative target continues from the link's directory under the same
  rules, an absolute one must lie under an allowed root and is walked from that root. A
  target that leaves the roots is ``forbidden_reference``; more than 40 links is
  ``invalid_reference``.
- Only regular files are opened. The last component is checked with ``fstatat`` before it
  is opened (a FIFO, a socket or a device is never opened: ``forbidden_reference``), opened
  with ``O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`` (a FIFO swapped in cannot block the open) and
  checked again, by inode, on the descriptor. A directory is ``not_found``, as is a path
  through a regular file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote_to_bytes, urlsplit

from worker.errors import (
    ForbiddenReference,
    ImageTooLarge,
    InvalidReference,
    ObjectNotFound,
    StorageUnavailable,
)

__all__ = ["LocalStore", "Located"]

NAME_MAX = 255
PATH_MAX = 4096  # bytes, the terminating NUL included
MAX_LINKS = 40  # as the kernel's own limit
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _components(path: bytes) -> list[bytes]:
    return [part for part in path.split(b"/") if part not in (b"", b".")]


class Located:
    """The last component of a confined path: its name, and its directory held open.
    The file itself may not exist (``exists``); ``open`` refuses anything but a regular file."""

    def __init__(self, dir_fd: int, name: bytes, path: Path, ref: str) -> None:
        self.dir_fd, self.raw_name, self.path, self.ref = dir_fd, name, path, ref
        self.name = os.fsdecode(name)

    def _lstat(self) -> os.stat_result | None:
        try:
            return os.stat(self.raw_name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        return self._lstat() is not None

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """The regular file, read-only."""
        with _os_errors(self.ref):
            before = self._lstat()
            if before is None:
                raise ObjectNotFound(f"{self.ref} does not exist")
            _check_regular(before, self.ref)
            fd = os.open(self.raw_name, _FILE_FLAGS, dir_fd=self.dir_fd)
            try:
                after = os.fstat(fd)
                _check_regular(after, self.ref)
                if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
                    raise ForbiddenReference(f"{self.ref} was replaced while being opened")
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
        with os.fdopen(fd, "rb") as handle:
            yield handle

    def unlink(self, expected: os.stat_result) -> bool:
        """Delete the name while it is still the file ``expected`` describes; ``False`` when
        another file has taken the name."""
        now = self._lstat()
        if now is None:
            return True
        if (now.st_dev, now.st_ino) != (expected.st_dev, expected.st_ino):
            return False
        os.unlink(self.raw_name, dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)
        return True


def _check_regular(info: os.stat_result, ref: str) -> None:
    if stat.S_ISREG(info.st_mode):
        return
    if stat.S_ISDIR(info.st_mode):
        raise ObjectNotFound(f"{ref} is a directory")
    if stat.S_ISLNK(info.st_mode):
        raise ForbiddenReference(f"{ref} changed into a symlink while being read")
    raise ForbiddenReference(f"{ref} is not a regular file (a FIFO, socket or device)")


@contextmanager
def _os_errors(ref: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"{ref} does not exist") from exc
    except PermissionError as exc:
        raise ForbiddenReference(f"{ref}: permission denied") from exc
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise ObjectNotFound(f"{ref}: a component is not a directory") from exc
        if exc.errno == errno.ENAMETOOLONG:
            raise InvalidReference(f"{ref}: a name is too long") from exc
        if exc.errno == errno.ELOOP:
            raise ForbiddenReference(f"{ref} changed into a symlink while being read") from exc
        if exc.errno in (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
            raise ForbiddenReference(f"{ref} is not a regular file") from exc
        raise StorageUnavailable(f"cannot read {ref}: {exc}") from exc


class LocalStore:
    def __init__(self, roots: Iterable[Path]) -> None:
        roots = list(roots)
        self.roots = tuple(Path(os.path.realpath(root)) for root in roots)
        # Each root as a reference may spell it (as configured, or its real path), with the
        # real path the walk starts from.
        self._spellings: list[tuple[tuple[bytes, ...], bytes]] = []
        for root in roots:
            real = os.fsencode(os.path.realpath(root))
            for spelling in {os.fsencode(os.path.abspath(root)), real}:
                self._spellings.append((tuple(_components(spelling)), real))
        self._spellings.sort(key=lambda item: len(item[0]))  # the outermost root first

    def read(self, ref: str, max_bytes: int) -> bytes:
        with self.locate(ref) as found, found.open() as handle, _os_errors(ref):
            # Read what the file holds, not a buffer the size of the cap (40 MB a call).
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(min(size, max_bytes) + 1)
            if len(data) > size:  # it grew while being read: read on, up to the cap
                data += handle.read(max_bytes + 1 - len(data))
        if len(data) > max_bytes:
            raise ImageTooLarge(f"{ref} is over the {max_bytes}-byte limit")
        return data

    @contextmanager
    def locate(self, ref: str) -> Iterator[Located]:
        """The last component of ``ref``'s path, walked to under an allowed root."""
        parts = _parse(ref)
        held: list[int] = []
        try:
            with _os_errors(ref):
                name, shown = self._walk(ref, parts, held)
            yield Located(held[-1], name, Path(os.fsdecode(b"/".join(shown))), ref)
        finally:
            for fd in held:
                os.close(fd)

    def _root_of(self, parts: list[bytes], ref: str) -> tuple[bytes, list[bytes]]:
        for prefix, real in self._spellings:
            if tuple(parts[: len(prefix)]) == prefix:
                return real, parts[len(prefix) :]
        raise ForbiddenReference(f"{ref} is outside the allowed roots")

    def _enter_root(
        self, parts: list[bytes], ref: str, held: list[int]
    ) -> tuple[list[bytes], list[bytes]]:
        """Close what the walk holds and start again at the root ``parts`` begin with: the
        components under it, and the path walked so far."""
        real, rest = self._root_of(parts, ref)
        while held:
            os.close(held.pop())
        held.append(os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        return rest, [real]

    def _walk(self, ref: str, parts: list[bytes], held: list[int]) -> tuple[bytes, list[bytes]]:
        """Open each directory of the path in turn (into ``held``); the last name, and the
        path walked (for names and messages)."""
        pending, shown = self._enter_root(parts, ref, held)
        if not pending:
            raise ObjectNotFound(f"{ref} is a directory")
        links = 0
        while True:
            name = pending.pop(0)
            if name == b"..":
                if len(held) == 1:
                    raise ForbiddenReference(f"{ref} leads above its root")
                os.close(held.pop())
                shown.pop()
                if not pending:
                    raise ObjectNotFound(f"{ref} is a directory")
                continue
            info = _lstat(name, held[-1])
            if info is not None and stat.S_ISLNK(info.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise InvalidReference(f"{ref}: more than {MAX_LINKS} symlinks")
                pending = self._follow(ref, name, held, pending, shown)
                if not pending:
                    raise ObjectNotFound(f"{ref} is a directory")
                continue
            if not pending:
                return name, [*shown, name]
            if info is None:
                raise ObjectNotFound(f"{ref} does not exist")
            if not stat.S_ISDIR(info.st_mode):
                raise ObjectNotFound(f"{ref}: {os.fsdecode(name)} is not a directory")
            try:
                held.append(os.open(name, _DIR_FLAGS, dir_fd=held[-1]))
            except NotADirectoryError:  # swapped for a link or a file since the lstat
                links += 1
                pending.insert(0, name)
                continue
            shown.append(name)

    def _follow(
        self, ref: str, name: bytes, held: list[int], pending: list[bytes], shown: list[bytes]
    ) -> list[bytes]:
        """The components still to walk once the link ``name`` is replaced by its target."""
        try:
            target = os.readlink(name, dir_fd=held[-1])
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return [name, *pending]  # no longer a link: look again
        if b"\x00" in target or not target:
            raise InvalidReference(f"{ref}: a symlink with an unusable target")
        if target.startswith(b"/"):
            rest, fresh = self._enter_root(_components(target), ref, held)
            shown[:] = fresh
            return [*rest, *pending]
        return [*_components(target), *pending]


def _lstat(name: bytes, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _parse(ref: str) -> list[bytes]:
    try:
        parts = urlsplit(ref)
    except ValueError as exc:
        raise InvalidReference(f"{ref!r} is not a valid file reference: {exc}") from exc
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise InvalidReference(f"not a local file reference: {ref!r}")
    if parts.query or parts.fragment or "?" in ref or "#" in ref:
        raise InvalidReference(f"{ref!r}: a file reference has no query or fragment")
    path = unquote_to_bytes(parts.path)
    if b"\x00" in path:
        raise InvalidReference(f"{ref!r}: the path holds a NUL byte")
    if not path.startswith(b"/"):
        raise InvalidReference(f"{ref!r}: the path is not absolute")
    if len(path) >= PATH_MAX:
        raise InvalidReference(f"{ref!r}: the path is over {PATH_MAX - 1} bytes")
    components = path.split(b"/")
    if any(len(part) > NAME_MAX for part in components):
        raise InvalidReference(f"{ref!r}: a name is over {NAME_MAX} bytes")
    if path.endswith(b"/"):
        raise ObjectNotFound(f"{ref} names a directory")
    return [part for part in components if part not in (b"", b".")]
