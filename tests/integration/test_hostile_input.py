"""Hostile input through a real `modq worker`: hostile images, references that try to leave
their allowlists (files, buckets, private addresses, redirects, oversize bodies) and messages
that are no request. Each test reports rows of the reliability table (docs/reliability.md)
built from what it saw: result codes, connection counts, bytes, access times, memory.

Three workers in all: one with no HTTP allowance (images, files, buckets, private addresses),
one allowed to reach 127.0.0.1 only (redirects from there, oversize bodies), one for messages.
"""

from __future__ import annotations

import io
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import numpy as np
import pytest
import redis
from kombu import Connection
from PIL import Image

from tests.conftest import Observe
from tests.integration.conftest import WorkerFactory
from tests.support.corpus import EXAMPLES, hostile_samples
from tests.support.receivers import STREAM, Collector, drain
from tests.support.reliability import scaled
from tests.support.s3_server import S3Server
from tests.support.tls import TlsFiles, make_tls
from tests.support.worker_process import WorkerProcess
from worker.config import Settings
from worker.errors import ForbiddenReference, StorageUnavailable
from worker.messages import MAX_METADATA_BYTES, Status
from worker.queue.app import MODERATE_TASK, create_app
from worker.queue.client import Client
from worker.storage import HttpStore, NetworkGuard, build_store

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

CALLBACK = f"redis-stream://{STREAM}"
OK = "ok"
ROUNDS = scaled(3, 10)
#: the worker's byte cap in these tests (the default is 40 MiB)
IMAGE_CAP = 2_500_000
#: resident memory the worker may gain over all rounds of hostile images, and from the end of
#: the first round to the last. Warm-up costs ~70 MB; after it glibc's per-thread malloc arenas
#: (64 task threads) keep adding a little for a while: ~+25 MB over 3 rounds, +55 to +70 MB
#: over 10 or 30; with MALLOC_ARENA_MAX=2 it is flat after round 9 (measured on 2 cores).
RSS_BOUND_MB = 250.0
RSS_GROWTH_MB = 100.0
PRIVATE_LITERALS = ("10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254")


# --- helpers -------------------------------------------------------------------------------


def _photo() -> bytes:
    """A real photo (JPEG) that classifies fine: what a reference would read if it escaped."""
    return (EXAMPLES / "astronaut.jpg").read_bytes()


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _rss_mb(worker: WorkerProcess) -> float:
    assert worker.process is not None
    status = Path(f"/proc/{worker.process.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


def _collect(collector: Collector, ids: list[str], timeout: float) -> dict[str, float]:
    """Seconds from now until the first result of each id arrived; fails on any missing."""
    start = time.monotonic()
    arrived: dict[str, float] = {}
    while time.monotonic() - start < timeout and len(arrived) < len(ids):
        collector.poll()
        now = time.monotonic() - start
        for request_id in ids:
            if request_id in collector.results and request_id not in arrived:
                arrived[request_id] = now
    missing = sorted(set(ids) - arrived.keys())
    assert not missing, f"no result within {timeout} s for {missing}"
    return arrived


def _settle(collector: Collector, seconds: float = 1.0) -> None:
    """Keep reading a little longer, so a second result for any request would show."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        collector.poll()


def _code(collector: Collector, request_id: str) -> str:
    [result] = collector.results[request_id]
    if result.status is Status.OK:
        assert result.verdict is not None, result
        return OK
    assert result.error is not None, result
    return result.error.code


def _summary(codes: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for code in codes.values():
        counts[code] = counts.get(code, 0) + 1
    return ", ".join(f"{n}x `{code}`" for code, n in sorted(counts.items()))


def _atime(path: Path) -> float:
    return os.stat(path).st_atime


def _age_atime(path: Path) -> float:
    """Set the access time well before the modification time: under relatime (and
    strictatime) the next read of the content moves it, so the file shows whether it was read."""
    stat = os.stat(path)
    os.utime(path, (stat.st_mtime - 3600, stat.st_mtime))
    return _atime(path)


# --- servers that count what reaches them ----------------------------------------------------


class _Site(ThreadingHTTPServer):
    """An HTTP(S) server that counts accepted connections and serves: ``/redirect?to=URL``
    (302), ``/big`` and ``/big-declared`` (an endless body, without and with a huge
    Content-Length; bytes actually written are recorded per path) and an image anywhere else."""

    daemon_threads = True
    big_bytes = 64 * 1024 * 1024

    def __init__(self, host: str, image: bytes, tls: TlsFiles | None = None, port: int = 0):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _SiteHandler)
        self.image = image
        self.accepted = 0
        self.gets: list[str] = []
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()
        if tls is not None:
            self.socket = tls.server_context().wrap_socket(self.socket, server_side=True)
        bracketed = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if tls else 'http'}://{bracketed}:{self.server_address[1]}"

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        with self._lock:
            self.accepted += 1
        return connection, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up on purpose (caps)

    def wait_sent(self, path: str, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while path not in self.sent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path in self.sent, f"the server never finished writing {path}"
        return self.sent[path]


class _SiteHandler(BaseHTTPRequestHandler):
    server: _Site
    timeout = 30  # a client that stops reading cannot hold a handler thread for ever

    def do_GET(self) -> None:
        self.server.gets.append(self.path)
        path, _, query = self.path.partition("?")
        if path == "/redirect":
            self._reply(302, b"", Location=parse_qs(query)["to"][0])
        elif path in ("/big", "/big-declared"):
            self._stream(path, declared=path == "/big-declared")
        else:
            self._reply(200, self.server.image, Content_Type="image/jpeg")

    def _reply(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, path: str, declared: bool) -> None:
        """HTTP/1.0: without Content-Length the body runs until the connection closes."""
        sent = 0
        chunk = self.server.image * (65536 // len(self.server.image) + 1)
        chunk = chunk[:65536]
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if declared:
                self.send_header("Content-Length", str(self.server.big_bytes))
            self.end_headers()
            while sent < self.server.big_bytes:
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the reader hung up
        finally:
            self.server.sent[path] = sent

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def _serving(*sites: _Site) -> Iterator[None]:
    threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in sites]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for site in sites:
            site.shutdown()
            site.server_close()


def _loopback_pair(image: bytes) -> tuple[_Site, _Site]:
    """Plain HTTP listeners on 127.0.0.1 and [::1], on the same port where it is free."""
    v4 = _Site("127.0.0.1", image)
    try:
        v6 = _Site("::1", image, port=v4.server_address[1])
    except OSError:
        v6 = _Site("::1", image)
    return v4, v6


class _ConnectSpy:
    """Records every ``socket.connect``/``connect_ex`` in this process while installed and
    refuses it, so a test sees whether any connection was even attempted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[Any] = []

        def refuse(sock: socket.socket, address: Any) -> Any:
            self.calls.append(address)
            raise ConnectionRefusedError(111, "refused by the test's connect spy")

        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _in_process_connects(
    monkeypatch: pytest.MonkeyPatch,
    store: HttpStore,
    urls: list[str],
) -> tuple[dict[str, str], list[Any]]:
    """Read ``urls`` through ``store`` in this process with connect() spied on: the error code
    of each, and every connect attempt."""
    codes: dict[str, str] = {}
    with monkeypatch.context() as patch:
        spy = _ConnectSpy(patch)
        for url in urls:
            try:
                store.read(url, IMAGE_CAP)
                codes[url] = OK
            except (ForbiddenReference, StorageUnavailable) as exc:
                codes[url] = exc.code
    store.close()
    return codes, spy.calls


# --- one worker, no HTTP allowance: images, files, buckets, private addresses ---------------


def _hostile_files(photo: bytes) -> dict[str, tuple[str, bytes, str]]:
    """The hostile images: name -> (file name, bytes, expected code or ok)."""
    samples = hostile_samples()
    expected = {
        "empty": ("empty.jpg", "empty_image"),
        "random": ("random.bin", "unsupported_format"),
        "truncated_jpeg": ("truncated.jpg", "corrupt_image"),
        "truncated_png": ("truncated.png", "corrupt_image"),
        "svg": ("vector.svg", "unsupported_format"),
        "png_bomb": ("bomb.png", "too_many_pixels"),
        "gif_many_frames": ("frames.gif", "too_many_frames"),
        "polyglot": ("polyglot.jpg", OK),
        "text_as_jpg": ("text.jpg", "unsupported_format"),
    }
    assert set(expected) == set(samples), "hostile_samples() changed: update the expectations"
    files = {name: (filename, samples[name], code) for name, (filename, code) in expected.items()}
    with Image.open(io.BytesIO(photo)) as image:
        rgb = image.convert("RGB")
    grey16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    files |= {
        "png16": ("grey16.png", _encode(Image.fromarray(grey16), "PNG"), OK),
        "cmyk_jpeg": ("cmyk.jpg", _encode(rgb.convert("CMYK"), "JPEG"), OK),
        # a valid JPEG with padding after its end marker: only the cap refuses it
        "over_byte_cap": ("over-cap.jpg", photo + bytes(IMAGE_CAP), "image_too_large"),
        "png_named_jpg": ("really-a-png.jpg", _encode(rgb, "PNG"), OK),
        "jpeg_named_gif": ("really-a-jpeg.gif", photo, OK),
    }
    return files


def _write_round(root: Path, files: dict[str, tuple[str, bytes, str]], n: int) -> dict[str, str]:
    """Write one round's files under ``root``; the images that classify get a few bytes
    after their end marker, so each round has new hashes and the model scores them again
    (no exact cache hit). Returns name -> file:// reference."""
    folder = root / f"round-{n}"
    folder.mkdir()
    refs = {}
    for name, (filename, data, code) in files.items():
        path = folder / filename
        path.write_bytes(data + f"round {n}".encode() if code == OK else data)
        refs[name] = path.as_uri()
    return refs


def test_hostile_images_files_buckets_and_private_addresses_through_one_worker(
    start_worker: WorkerFactory,
    s3_moto: S3Server,
    tmp_path: Path,
    observe: Observe,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    photo = _photo()
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    files = _hostile_files(photo)
    (root / "ok.jpg").write_bytes(photo)
    (root / "sub").mkdir()
    secret = outside / "secret.jpg"
    secret.write_bytes(photo)  # would classify fine: only the confinement can refuse it
    (root / "escape.jpg").symlink_to(secret)
    (root / "escape-dir").symlink_to(outside, target_is_directory=True)
    tag = uuid.uuid4().hex[:8]
    allowed_bucket = s3_moto.create_bucket(f"allowed-{tag}")
    other_bucket = s3_moto.create_bucket(f"other-{tag}")
    for bucket in (allowed_bucket, other_bucket):
        s3_moto.admin.put_object(Bucket=bucket, Key="photo.jpg", Body=photo)
    v4, v6 = _loopback_pair(photo)
    with _serving(v4, v6):
        worker = start_worker(
            {
                "MODQ_ALLOWED_ROOTS": str(root),
                "MODQ_ALLOWED_BUCKETS": allowed_bucket,
                "MODQ_MAX_IMAGE_BYTES": str(IMAGE_CAP),
                "MODQ_MAX_RETRIES": "1",  # anything retryable shows up fast, as itself
            }
        )
        collector = Collector(start_worker.broker_url)
        with Client(Settings(broker_url=start_worker.broker_url)) as client:
            _hostile_images_rounds(worker, client, collector, root, files, observe)
            _file_references(client, collector, root, outside, secret, observe)
            _bucket_references(client, collector, s3_moto, allowed_bucket, other_bucket, observe)
            _private_addresses(client, collector, v4, v6, observe, monkeypatch)
        assert worker.process is not None and worker.process.poll() is None, "the worker died"
        collector.close()


def _hostile_images_rounds(
    worker: WorkerProcess,
    client: Client,
    collector: Collector,
    root: Path,
    files: dict[str, tuple[str, bytes, str]],
    observe: Observe,
) -> None:
    rss = [_rss_mb(worker)]
    cache: dict[str, int] = {}
    round_seconds: list[float] = []
    slowest = 0.0
    seen: dict[str, str] = {}
    for n in range(ROUNDS):
        refs = _write_round(root, files, n)
        ids = {f"img-{n}-{name}": name for name in files}
        for request_id, name in ids.items():
            client.submit(refs[name], request_id=request_id, callback=CALLBACK)
        arrived = _collect(collector, list(ids), timeout=120)
        round_seconds.append(max(arrived.values()))
        slowest = max(slowest, *arrived.values())
        for request_id, name in ids.items():
            seen[name] = _code(collector, request_id)
            assert seen[name] == files[name][2], (name, collector.results[request_id])
            result = collector.results[request_id][0]
            if result.cache is not None:
                cache[result.cache.outcome.value] = cache.get(result.cache.outcome.value, 0) + 1
        rss.append(_rss_mb(worker))
    _settle(collector)
    ids_all = [f"img-{n}-{name}" for n in range(ROUNDS) for name in files]
    sent = len(ids_all)
    received = sum(len(collector.results.get(i, [])) for i in ids_all)
    duplicates = received - sent
    assert duplicates == 0
    alive = worker.process is not None and worker.process.poll() is None
    assert alive and "modq_verdicts_total" in worker.metrics()
    before, after = rss[0], rss[-1]
    assert after - before <= RSS_BOUND_MB, f"RSS {before:.0f} -> {after:.0f} MB: {rss}"
    assert rss[-1] - rss[1] <= RSS_GROWTH_MB, f"RSS kept growing after warm-up: {rss}"
    outcomes = ", ".join(f"{name} `{code}`" for name, code in seen.items())
    observe(
        "image.worker_memory",
        f"{len(files)} files x {ROUNDS} rounds as `file://` to one worker (byte cap "
        f"{IMAGE_CAP} B): {received} results for {sent} requests, each the expected one: "
        f"{outcomes}; slowest result {slowest:.1f} s after its round was sent (rounds took "
        + ", ".join(f"{s:.1f}" for s in round_seconds)
        + f" s); worker alive after; RSS {before:.0f} MB before, "
        + " → ".join(f"{r:.0f}" for r in rss[1:])
        + f" MB after each round (growth {after - before:+.0f} MB, "
        f"{rss[-1] - rss[1]:+.0f} MB after the first round); the verdicts' cache outcomes: "
        + ", ".join(f"{n} {outcome}" for outcome, n in sorted(cache.items()))
        + " (each round's images carry new bytes)",
        sent=sent,
        received=received,
        lost=sent - sum(1 for i in ids_all if i in collector.results),
        duplicates=duplicates,
    )


def _file_references(
    client: Client,
    collector: Collector,
    root: Path,
    outside: Path,
    secret: Path,
    observe: Observe,
) -> None:
    control = root / "ok.jpg"
    control_atime, secret_atime = _age_atime(control), _age_atime(secret)
    rel = f"{root}/../{outside.name}/{secret.name}"
    refs = {
        "dotdot": "file://" + quote(rel),
        "dotdot_encoded": "file://" + quote(str(root)) + f"/%2e%2e/{outside.name}/{secret.name}",
        "dotdot_deep": "file://" + quote(f"{root}/sub/../../{outside.name}/{secret.name}"),
        "dotdot_inside": "file://" + quote(f"{root}/sub/../ok.jpg"),
        "outside": secret.as_uri(),
        "outside_system": "file:///etc/hostname",
        "symlink": (root / "escape.jpg").as_uri(),
        "symlink_dir": (root / "escape-dir" / secret.name).as_uri(),
    }
    ids = {f"file-{key}": ref for key, ref in refs.items()}
    for request_id, ref in ids.items():
        client.submit(ref, request_id=request_id, callback=CALLBACK)
    _collect(collector, list(ids), timeout=60)
    _settle(collector, 0.5)
    codes = {key: _code(collector, f"file-{key}") for key in refs}
    control_read = _atime(control) != control_atime  # the in-root `..` read it
    secret_untouched = _atime(secret) == secret_atime
    assert codes["dotdot_inside"] == OK and control_read, "the access-time probe sees no read"
    for key in refs.keys() - {"dotdot_inside"}:
        assert codes[key] == "forbidden_reference", (key, collector.results[f"file-{key}"])
    assert secret_untouched, "the file outside the root was read"
    evidence = (
        f"the outside file (a photo that classifies `ok` in the root) kept its access time "
        f"({'unchanged' if secret_untouched else 'CHANGED'}; the same probe on an in-root file "
        f"{'did' if control_read else 'did not'} move when the worker read it)"
    )
    observe(
        "ref.file_dotdot",
        f"`root/../outside/x` → `{codes['dotdot']}`, `root/%2e%2e/outside/x` → "
        f"`{codes['dotdot_encoded']}`, `root/sub/../../outside/x` → `{codes['dotdot_deep']}`; "
        f"a `..` that stays inside the root (`root/sub/../ok.jpg`) → `{codes['dotdot_inside']}` "
        f"(paths are confined after resolving); {evidence}",
        sent=4,
        received=4,
    )
    observe(
        "ref.file_outside",
        f"an absolute path in a sibling directory → `{codes['outside']}`, `/etc/hostname` → "
        f"`{codes['outside_system']}`; {evidence}",
        sent=2,
        received=2,
    )
    observe(
        "ref.file_symlink",
        f"a symlinked file in the root pointing outside → `{codes['symlink']}`, a file under a "
        f"symlinked directory pointing outside → `{codes['symlink_dir']}`; {evidence}",
        sent=2,
        received=2,
    )


def _bucket_references(
    client: Client,
    collector: Collector,
    s3: S3Server,
    allowed: str,
    other: str,
    observe: Observe,
) -> None:
    refs = {
        "allowed": f"s3://{allowed}/photo.jpg",
        "other": f"s3://{other}/photo.jpg",
        "other_version": f"s3://{other}/photo.jpg?versionId=null",
        "dotdot_key": f"s3://{allowed}/../{other}/photo.jpg",
    }
    ids = {f"s3-{key}": ref for key, ref in refs.items()}
    for request_id, ref in ids.items():
        client.submit(ref, request_id=request_id, callback=CALLBACK)
    _collect(collector, list(ids), timeout=60)
    _settle(collector, 0.5)
    codes = {key: _code(collector, f"s3-{key}") for key in refs}
    log = s3.log_tail(10**9)
    allowed_gets = len(re.findall(rf'"GET /{allowed}/photo\.jpg', log))
    other_gets = len(re.findall(rf'"(?:GET|HEAD) /{other}/', log))
    assert codes["allowed"] == OK and allowed_gets >= 1, "the S3 access log shows no reads"
    assert codes["other"] == codes["other_version"] == "forbidden_reference", codes
    # `..` segments are refused before S3 is asked: a proxy that normalised the path could
    # otherwise reach another bucket.
    assert codes["dotdot_key"] == "invalid_reference", codes
    assert other_gets == 0, f"the worker asked S3 for objects of {other}"
    observe(
        "ref.s3_bucket",
        f"the same photo in a bucket not on the allowlist → `{codes['other']}` (with "
        f"`?versionId=` → `{codes['other_version']}`), in the allowed bucket → "
        f"`{codes['allowed']}`; S3's access log: {allowed_gets} GET of the allowed object, "
        f"{other_gets} requests for the other bucket; `s3://allowed/../other/key` → "
        f"`{codes['dotdot_key']}` (dot segments refused before S3 is asked)",
        sent=3,
        received=3,
    )


def _private_addresses(
    client: Client,
    collector: Collector,
    v4: _Site,
    v6: _Site,
    observe: Observe,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p4, p6 = v4.server_address[1], v6.server_address[1]
    literals = {
        "v4": f"{v4.url}/a.jpg",
        "v4_https": f"https://127.0.0.1:{p4}/a.jpg",
        "v6": f"{v6.url}/a.jpg",
        "v6_https": f"https://[::1]:{p6}/a.jpg",
        "v4_mapped": f"http://[::ffff:127.0.0.1]:{p4}/a.jpg",
        "v4_decimal": f"http://2130706433:{p4}/a.jpg",
        "v4_short": f"http://127.1:{p4}/a.jpg",
        "v4_any": f"http://0.0.0.0:{p4}/a.jpg",
        **{address: f"http://{address}/a.jpg" for address in PRIVATE_LITERALS},
        "metadata_path": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    }
    names = {
        "localhost": f"http://localhost:{p4}/a.jpg",
        "localhost_upper": f"http://LOCALHOST:{p4}/a.jpg",
        "localhost_https": f"https://localhost:{p4}/a.jpg",
    }
    urls = {**literals, **names}
    ids = {f"net-{key.replace('.', '-')}": key for key in urls}
    for request_id, key in ids.items():
        client.submit(urls[key], request_id=request_id, callback=CALLBACK)
    arrived = _collect(collector, list(ids), timeout=60)
    _settle(collector, 0.5)
    codes = {key: _code(collector, request_id) for request_id, key in ids.items()}
    slowest = {key: arrived[request_id] for request_id, key in ids.items()}
    assert all(code == "forbidden_reference" for code in codes.values()), codes
    assert (v4.accepted, v6.accepted) == (0, 0), "a listener on loopback was connected to"
    worker_accepts = (v4.accepted, v6.accepted)
    for site in (v4, v6):  # the counters do count: one connection of our own to each
        socket.create_connection(site.server_address[:2], timeout=5).close()
    probe_deadline = time.monotonic() + 10
    while (v4.accepted, v6.accepted) != (1, 1) and time.monotonic() < probe_deadline:
        time.sleep(0.05)
    assert (v4.accepted, v6.accepted) == (1, 1), "the listeners do not count connections"

    # The same store the worker builds, in this process, with connect() spied on: not one
    # attempt for any of them; the control shows the spy sees a connect when one is allowed.
    settings = Settings(http_allowed_networks=[], http_timeout_s=2.0)
    store = build_store(settings.storage, settings.http)
    http = store.store_for("http://x/")
    assert isinstance(http, HttpStore)
    local_codes, attempts = _in_process_connects(monkeypatch, http, list(urls.values()))
    resolver_names = {
        "evil.test": ["10.0.0.1"],
        "meta.test": ["169.254.169.254"],
        "mixed.test": ["93.184.216.34", "192.168.1.1"],
        "six.test": ["fd00::1"],
    }
    guarded = HttpStore(
        NetworkGuard((), resolver=lambda host, port: resolver_names[host]), timeout_s=2.0
    )
    name_codes, name_attempts = _in_process_connects(
        monkeypatch, guarded, [f"http://{name}/a.jpg" for name in resolver_names]
    )
    allowed = HttpStore(NetworkGuard(("10.0.0.0/8",)), timeout_s=2.0)
    control_codes, control_attempts = _in_process_connects(
        monkeypatch, allowed, ["http://10.0.0.1/a.jpg"]
    )
    assert set(local_codes.values()) == set(name_codes.values()) == {"forbidden_reference"}
    assert attempts == [] and name_attempts == []
    assert control_codes == {"http://10.0.0.1/a.jpg": "storage_unavailable"}
    assert control_attempts == [("10.0.0.1", 80)], "the connect spy sees nothing"

    literal_codes = {key: codes[key] for key in literals}
    observe(
        "ref.http_private",
        f"worker: {len(literals)} URLs (http and https to 127.0.0.1 and [::1] with listeners "
        f"running, [::ffff:127.0.0.1], 2130706433, 127.1, 0.0.0.0, "
        f"{', '.join(PRIVATE_LITERALS)}) → {_summary(literal_codes)}, all within "
        f"{max(slowest[k] for k in literals):.1f} s of sending; the listeners on 127.0.0.1 "
        f"and [::1] accepted {worker_accepts[0]} and {worker_accepts[1]} connections from the "
        f"worker (a probe connection of the test's own was counted on each); the worker's "
        f"HttpStore in the test process with socket.connect spied on: "
        f"{_summary(local_codes)}, {len(attempts)} connect() calls (control: 10/8 allowed → "
        f"{len(control_attempts)} call to {control_attempts[0][0]})",
        sent=len(literals),
        received=len(literals),
    )
    name_worker = {key: codes[key] for key in names}
    observe(
        "ref.http_name_private",
        f"worker: `localhost`, `LOCALHOST` (http) and `localhost` (https) → "
        f"{_summary(name_worker)}; the listener on 127.0.0.1 (where /etc/hosts sends "
        f"localhost) accepted {worker_accepts[0]} connections; names resolved (by a test resolver) "
        f"to 10.0.0.1, 169.254.169.254, fd00::1, and to a public and a private address at once "
        f"→ {_summary(name_codes)} with {len(name_attempts)} connect() calls",
        sent=len(names),
        received=len(names),
    )


# --- one worker allowed to reach 127.0.0.1: redirects from there, oversize bodies -----------


def test_redirects_to_private_addresses_and_oversize_bodies(
    start_worker: WorkerFactory, tmp_path: Path, observe: Observe
) -> None:
    photo = _photo()
    cap = 1_000_000
    tls = make_tls(tmp_path / "tls", ips=("127.0.0.1",))
    host = _Site("127.0.0.1", photo, tls=tls)
    six = _Site("::1", photo)
    neighbour = _Site("127.0.0.2", photo)
    p6, p2 = six.server_address[1], neighbour.server_address[1]
    targets = {
        "v6": f"{six.url}/x.jpg",
        "v6_https": f"https://[::1]:{p6}/x.jpg",
        "v6_scheme_relative": f"//[::1]:{p6}/x.jpg",
        "neighbour": f"{neighbour.url}/x.jpg",
        "neighbour_mapped": f"http://[::ffff:127.0.0.2]:{p2}/x.jpg",
        "private_10": "http://10.0.0.1/x.jpg",
        "metadata": "http://169.254.169.254/latest/meta-data/",
    }
    with _serving(host, six, neighbour):
        start_worker(
            {
                "MODQ_HTTP_ALLOWED_NETWORKS": "127.0.0.1/32",
                "SSL_CERT_FILE": str(tls.ca),
                "MODQ_MAX_IMAGE_BYTES": str(cap),
                "MODQ_MAX_RETRIES": "1",
            }
        )
        collector = Collector(start_worker.broker_url)
        refs = {
            "control": f"{host.url}/redirect?to=/photo.jpg",
            **{key: f"{host.url}/redirect?to={quote(t, safe='')}" for key, t in targets.items()},
            "big": f"{host.url}/big",
            "big_declared": f"{host.url}/big-declared",
        }
        ids = {f"http-{key}": key for key in refs}
        with Client(Settings(broker_url=start_worker.broker_url)) as client:
            for request_id, key in ids.items():
                client.submit(refs[key], request_id=request_id, callback=CALLBACK)
        arrived = _collect(collector, list(ids), timeout=90)
        _settle(collector)
        codes = {key: _code(collector, request_id) for request_id, key in ids.items()}
        sent_big, sent_declared = host.wait_sent("/big"), host.wait_sent("/big-declared")
        collector.close()
    redirects_served = sum(1 for path in host.gets if path.startswith("/redirect"))
    assert codes["control"] == OK, "a redirect to the same allowed host is not followed"
    redirect_codes = {key: codes[key] for key in targets}
    assert set(redirect_codes.values()) == {"forbidden_reference"}, redirect_codes
    assert redirects_served == len(targets) + 1, host.gets  # one GET each: no retries
    assert (six.accepted, neighbour.accepted) == (0, 0), "a redirect target was contacted"
    observe(
        "ref.http_redirect",
        f"the allowed https image host (127.0.0.1/32) answered 302 to [::1] (http, https, "
        f"scheme-relative), 127.0.0.2, [::ffff:127.0.0.2], 10.0.0.1 and 169.254.169.254 → "
        f"{_summary(redirect_codes)} (slowest {max(arrived[f'http-{k}'] for k in targets):.1f} s);"
        f" {redirects_served} redirects served, one per request; listeners on [::1] and "
        f"127.0.0.2 accepted {six.accepted} and {neighbour.accepted} connections; a redirect "
        f"to the same host → `{codes['control']}`",
        sent=len(targets),
        received=len(targets),
    )
    assert codes["big"] == codes["big_declared"] == "image_too_large", codes
    assert max(sent_big, sent_declared) < _Site.big_bytes
    observe(
        "ref.http_oversize",
        f"a {_Site.big_bytes >> 20} MiB body against a {cap} B cap: without Content-Length → "
        f"`{codes['big']}`, the server wrote {sent_big / 2**20:.1f} MiB before the worker hung "
        f"up; with Content-Length → `{codes['big_declared']}`, the server wrote "
        f"{sent_declared / 2**20:.1f} MiB (socket buffers included)",
        sent=2,
        received=2,
    )


# --- one worker for messages that are no request ------------------------------------------


class _Trap:
    """Unpickling this creates ``path``: if the directory appears, something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (str(self.path),))


def _publish_raw(broker_url: str, queue: str, task_id: str, body: bytes) -> None:
    """A message with Celery's task headers whose JSON body does not parse."""
    headers = {
        "lang": "py", "task": MODERATE_TASK, "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": "(...)", "kwargsrepr": "{}", "origin": "test", "ignore_result": True,
    }  # fmt: skip
    with Connection(broker_url) as connection:
        connection.Producer().publish(
            body,
            exchange="",
            routing_key=queue,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            properties={"correlation_id": task_id},
        )


def test_invalid_and_pickled_messages_are_answered_or_refused_and_the_worker_survives(
    start_worker: WorkerFactory, tmp_path: Path, observe: Observe
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(_photo())
    ok_uri = (images / "ok.jpg").as_uri()
    trap = tmp_path / "unpickled"
    worker = start_worker({"MODQ_ALLOWED_ROOTS": str(images)})
    broker = start_worker.broker_url
    collector = Collector(broker)
    app = create_app(Settings(broker_url=broker))
    # A request missing its image, with a valid callback: an error result comes back.
    app.send_task(MODERATE_TASK, args=[{"request_id": "bad-1", "callback": CALLBACK}])
    # A pickled message whose unpickling would create a directory: refused before anything
    # reads it.
    app.send_task(
        MODERATE_TASK,
        args=[{"request_id": "pickled", "image": ok_uri, "callback": CALLBACK, "x": _Trap(trap)}],
        serializer="pickle",
        task_id="pickled",
    )
    app.send_task(MODERATE_TASK, args=["not an object"])
    # Malformed JSON under Celery's task headers: the body would be a valid request if the
    # closing brackets were there; the same message, complete, is the control.
    for request_id, tail in (("bad-json", ""), ("good-json", "}], {}, {}]")):
        body = f'[[{{"request_id": "{request_id}", "image": "{ok_uri}", "callback": "{CALLBACK}"'
        _publish_raw(broker, "modq", request_id, (body + tail).encode())
    # 10 MB of metadata (the limit is 16 KiB), with a valid image and callback.
    blob = "x" * (10 * 1024 * 1024)
    big = {"request_id": "big-meta", "image": ok_uri, "callback": CALLBACK,
           "metadata": {"blob": blob}}  # fmt: skip
    app.send_task(MODERATE_TASK, args=[big], task_id="big-meta")
    with Client(Settings(broker_url=broker)) as client:
        client.submit(ok_uri, request_id="after", callback=CALLBACK)
    _collect(collector, ["bad-1", "big-meta", "good-json", "after"], timeout=90)
    _settle(collector)
    [bad] = collector.results["bad-1"]
    [after] = collector.results["after"]
    [big_result] = collector.results["big-meta"]
    assert bad.error is not None and bad.error.code == "invalid_request"
    assert big_result.error is not None and big_result.error.code == "invalid_request"
    assert big_result.metadata == {}, "the oversize metadata was echoed back"
    assert str(MAX_METADATA_BYTES) in big_result.error.message
    assert after.status is Status.OK
    assert _code(collector, "good-json") == OK, "the raw-published control was not answered"
    assert "pickled" not in collector.results and "bad-json" not in collector.results
    assert not trap.exists(), "the pickled message was unpickled"
    dead = drain(broker, "modq.dead")
    # Refused before any task runs, yet kept: the pickle unread, the broken JSON as text.
    by_reason = {d[0][0]["reason"]: d[0][0] for d in dead}
    assert by_reason["content_disallowed"]["message"]["headers"]["id"] == "pickled"
    assert by_reason["undecodable"]["message"]["headers"]["id"] == "bad-json"
    reasons = sorted(d[0][0]["reason"] for d in dead if d[0][0]["reason"] == "invalid_request")
    assert sorted(d[0][0]["reason"] for d in dead) == sorted(
        ["invalid_request"] * 3 + ["content_disallowed", "undecodable"]
    ), [d[0][0]["reason"] for d in dead]
    [big_dead] = [d[0][0] for d in dead if isinstance(d[0][0]["request"], dict)
                  and d[0][0]["request"].get("request_id") == "big-meta"]  # fmt: skip
    carried = len(big_dead["request"]["metadata"]["blob"])
    assert carried == len(blob)
    left = redis.Redis.from_url(broker).llen("modq")
    assert left == 0, "refused messages are still queued (a redelivery loop)"
    assert worker.process is not None and worker.process.poll() is None
    survived = f"the next request → `{_code(collector, 'after')}`; worker alive"
    observe(
        "msg.pickle",
        f"a pickle-serialized task whose unpickling would create a directory: "
        "dead-lettered unread as `content_disallowed`, "
        f"{len(collector.results.get('pickled', []))} results, the directory "
        f"{'exists' if trap.exists() else 'was never created'}; {survived}",
        sent=1,
        received=0,
    )
    observe(
        "msg.bad_json",
        f"a truncated JSON body with Celery's task headers: dead-lettered as `undecodable` "
        f"with its text, then removed ({left} left on the queue), "
        f"{len(collector.results.get('bad-json', []))} results (the same message with its "
        f"closing brackets → `{_code(collector, 'good-json')}`); {survived}",
        sent=1,
        received=0,
    )
    observe(
        "msg.missing_fields",
        f"a request without `image` → `{bad.error.code}` at its callback, dead-lettered as "
        f"`{reasons[0]}`; a bare string as the message → dead-lettered (no callback to answer); "
        f"{survived}",
        sent=2,
        received=1,
    )
    observe(
        "msg.big_metadata",
        f"{len(blob) >> 20} MiB of metadata (limit {MAX_METADATA_BYTES} B) went through the "
        f"broker → `{big_result.error.code}` at its callback (metadata not echoed), "
        f"dead-lettered with the whole request ({carried >> 20} MiB carried); {survived}",
        sent=1,
        received=1,
    )
    app.close()
    collector.close()
