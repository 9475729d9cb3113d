"""Hash banks in the pipeline (real bundled model, in-memory bank store): a match blocks
before the cache and the model, near-duplicates match, disabled banks and low-quality images
do not, and an unreadable bank store never lets an image through unchecked once banks exist."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.images import textured
from worker.actions import Actions
from worker.banks import BankInfo, BankMatch, MemoryBankStore, PdqHash, pdq_hash
from worker.banks.gate import BankGate
from worker.cache import MemoryCache
from worker.errors import BankUnavailable, ConfigError
from worker.messages import CacheOutcome, Status, Verdict
from worker.models.backend import Backend, BatchOutput
from worker.models.factory import create_backend
from worker.pipeline import Pipeline
from worker.policy import Policy
from worker.quarantine import LocalQuarantine
from worker.storage import LocalStore, file_ref

ALLOW_ALL = Policy("allow-all", 1.0, 1.0)


class CountingBackend(Backend):
    """The bundled model, counting the images it scores."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.card = inner.card
        self.scored = 0

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.inner.preprocess(image)

    def forward(self, batch: np.ndarray, embed: bool = False) -> BatchOutput:
        self.scored += len(batch)
        return self.inner.forward(batch, embed)


def _jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model() -> Backend:
    return create_backend("opennsfw")


@pytest.fixture
def backend(model: Backend) -> CountingBackend:
    return CountingBackend(model)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    known = textured(1, 400)
    images = {
        "known.jpg": _jpeg(known),
        "resized.jpg": _jpeg(known.resize((200, 200), Image.Resampling.LANCZOS), quality=60),
        "other.jpg": _jpeg(textured(2, 400)),
        "flat.png": b"",
    }
    folder = tmp_path / "uploads"
    folder.mkdir()
    paths = {}
    for name, data in images.items():
        paths[name] = folder / name
        if name == "flat.png":
            Image.new("RGB", (300, 300), (120, 120, 120)).save(paths[name])
        else:
            paths[name].write_bytes(data)
    return paths


def _bank_of(*images: Image.Image, name: str = "ncmec-demo") -> MemoryBankStore:
    store = MemoryBankStore()
    store.add(name, [pdq_hash(image).hex for image in images], "test")
    return store


def _pipeline(
    backend: Backend, files: dict[str, Path], store: MemoryBankStore, **kw: object
) -> Pipeline:
    folder = next(iter(files.values())).parent
    return Pipeline(
        backend,
        LocalStore([folder]),
        ALLOW_ALL,
        banks=BankGate(store, refresh_s=0),
        **kw,  # type: ignore[arg-type]
    )


def test_a_banked_image_is_blocked_naming_the_bank_and_the_model_never_runs(
    backend: CountingBackend, files: dict[str, Path]
) -> None:
    store = _bank_of(Image.open(files["known.jpg"]).convert("RGB"))
    with _pipeline(backend, files, store) as pipeline:
        result = pipeline.process(file_ref(files["known.jpg"]))
    assert result.status is Status.OK and result.verdict is Verdict.BLOCK
    assert result.bank is not None and result.bank.bank == "ncmec-demo"
    assert result.bank.distance <= 8  # the draft-decoded upload against the full-size hash
    assert result.nsfw_score is None and backend.scored == 0
    assert result.hashes is not None and result.hashes.pdq is not None


def test_a_resized_recompressed_copy_matches_within_the_radius(
    backend: CountingBackend, files: dict[str, Path]
) -> None:
    store = _bank_of(Image.open(files["known.jpg"]).convert("RGB"))
    with _pipeline(backend, files, store) as pipeline:
        near = pipeline.process(file_ref(files["resized.jpg"]))
        other = pipeline.process(file_ref(files["other.jpg"]))
    assert near.verdict is Verdict.BLOCK and near.bank is not None
    assert 0 < near.bank.distance <= 31
    assert other.verdict is Verdict.ALLOW and other.bank is None  # the model decided
    assert backend.scored == 1


def test_a_disabled_bank_does_not_match(backend: CountingBackend, files: dict[str, Path]) -> None:
    store = _bank_of(Image.open(files["known.jpg"]).convert("RGB"))
    store.set_enabled("ncmec-demo", False)
    with _pipeline(backend, files, store) as pipeline:
        off = pipeline.process(file_ref(files["known.jpg"]))
        store.set_enabled("ncmec-demo", True)
        on = pipeline.process(file_ref(files["known.jpg"]))
    assert off.verdict is Verdict.ALLOW and off.bank is None
    assert on.verdict is Verdict.BLOCK and on.bank is not None


def test_a_cached_safe_verdict_is_still_checked_against_a_bank_added_later(
    backend: CountingBackend, files: dict[str, Path]
) -> None:
    store = MemoryBankStore()
    store.add(
        "other", [pdq_hash(textured(99, 400)).hex], "test"
    )  # banks on, this image not in them
    cache = MemoryCache()
    ref = file_ref(files["known.jpg"])
    with _pipeline(backend, files, store, cache=cache) as pipeline:
        first = pipeline.process(ref)
        store.add("late", [first.hashes.pdq], "test")  # type: ignore[union-attr]
        again = pipeline.process(ref)
    assert first.verdict is Verdict.ALLOW and first.cache.outcome is CacheOutcome.MISS  # type: ignore[union-attr]
    assert again.verdict is Verdict.BLOCK and again.bank is not None
    assert again.bank.bank == "late" and again.bank.distance == 0
    assert backend.scored == 1


def test_flat_images_are_never_matched(backend: CountingBackend, files: dict[str, Path]) -> None:
    flat = Image.open(files["flat.png"]).convert("RGB")
    assert pdq_hash(flat).quality < 50
    store = _bank_of(flat)
    with _pipeline(backend, files, store) as pipeline:
        result = pipeline.process(file_ref(files["flat.png"]))
    assert result.bank is None and backend.scored == 1


def test_a_bank_block_is_quarantined(
    backend: CountingBackend, files: dict[str, Path], tmp_path: Path
) -> None:
    store = _bank_of(Image.open(files["known.jpg"]).convert("RGB"))
    folder = files["known.jpg"].parent
    quarantine = LocalQuarantine(tmp_path / "q", LocalStore([folder, tmp_path / "q"]))
    with _pipeline(backend, files, store, actions=Actions(quarantine=quarantine)) as pipeline:
        result = pipeline.process(file_ref(files["known.jpg"]))
    assert result.action is not None and result.action.kind == "quarantine_move"
    assert not files["known.jpg"].exists()
    assert Path(str(result.action.location).removeprefix("file://")).exists()


class FlakyStore(MemoryBankStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def banks(self) -> list[BankInfo]:
        if self.down:
            raise BankUnavailable("connection refused")
        return super().banks()

    def match(self, hex_hash: str, max_distance: int = 31) -> BankMatch | None:
        if self.down:
            raise BankUnavailable("connection refused")
        return super().match(hex_hash, max_distance)


def test_unreadable_banks_make_the_image_wait_once_banks_are_known(
    backend: CountingBackend, files: dict[str, Path]
) -> None:
    store = FlakyStore()
    store.down = True
    with _pipeline(backend, files, store) as pipeline:
        # never seen a bank: classify, as without the verdict cache
        unseen = pipeline.process(file_ref(files["other.jpg"]))
        store.down = False
        store.add("known", [pdq_hash(textured(5, 400)).hex], "test")
        seen = pipeline.process(file_ref(files["other.jpg"]))
        store.down = True
        waiting = pipeline.process(file_ref(files["other.jpg"]))
    assert unseen.status is Status.OK and seen.status is Status.OK
    assert waiting.status is Status.ERROR and waiting.error is not None
    assert waiting.error.code == "bank_unavailable" and waiting.error.retryable


def test_the_gate_reads_the_bank_list_at_most_every_refresh() -> None:
    now = [0.0]

    class Counting(MemoryBankStore):
        reads = 0

        def banks(self) -> list[BankInfo]:
            Counting.reads += 1
            return super().banks()

    gate = BankGate(Counting(), refresh_s=2.0, clock=lambda: now[0])
    assert not gate.active() and not gate.active()
    now[0] = 2.5
    gate.active()
    assert Counting.reads == 2
    assert gate.check(PdqHash("0" * 64, quality=10)) is None  # under the quality gate


class _Flaky(MemoryBankStore):
    """A bank store whose Redis can be switched off."""

    down = False

    def banks(self) -> list[BankInfo]:
        if self.down:
            raise BankUnavailable("bank store (redis) banks failed: connection refused")
        return super().banks()


def test_a_store_named_by_a_setting_must_be_readable_before_the_first_image() -> None:
    store = _Flaky()
    store.down = True
    with pytest.raises(ConfigError, match="MODQ_CACHE_URL: the hash banks cannot be read"):
        BankGate(store, explicit="MODQ_CACHE_URL").probe()
    # Only the built-in default, unreachable, means no banks.
    gate = BankGate(store, refresh_s=0)
    gate.probe()
    assert not gate.active()


def test_with_bank_url_set_every_failed_read_waits_even_with_no_bank_seen() -> None:
    store = _Flaky()
    gate = BankGate(store, refresh_s=0, required=True, explicit="MODQ_BANK_URL")
    gate.probe()
    assert not gate.active()
    store.down = True
    with pytest.raises(BankUnavailable):
        gate.active()


def test_on_the_fallback_banks_seen_at_start_make_a_later_outage_wait() -> None:
    store = _Flaky()
    store.add("known", ["f" * 64], source="test")
    gate = BankGate(store, refresh_s=0, explicit="MODQ_CACHE_URL")
    gate.probe()
    store.down = True
    with pytest.raises(BankUnavailable):
        gate.active()


def test_every_front_end_resolves_the_banks_as_modq_bank_does() -> None:
    from worker.banks.redis import RedisBankStore
    from worker.config import Settings

    def where(store: object) -> tuple[object, ...]:
        assert isinstance(store, RedisBankStore)
        kwargs = store.client.connection_pool.connection_kwargs
        return kwargs["host"], kwargs["port"], kwargs["db"]

    cases = (
        (Settings(bank_url="redis://b:1/2", cache_url="redis://c:1/1"), "MODQ_BANK_URL"),
        (Settings(cache_url="redis://c:1/1"), "MODQ_CACHE_URL"),
        (Settings(), None),
    )
    for settings, explicit in cases:
        gate = BankGate.from_settings(settings.banks)
        assert gate is not None
        # the same Redis `modq bank` writes to
        assert where(gate.store) == where(RedisBankStore.from_settings(settings.banks))
        assert gate.explicit == explicit
        assert gate.required is (explicit == "MODQ_BANK_URL")
        gate.close()
    assert BankGate.from_settings(Settings(cache_url=None).banks) is None


def test_a_worker_waits_for_the_bank_list_until_it_has_read_it_once() -> None:
    """A worker that started while the built-in default Redis was away cannot tell whether
    banks are on: its images wait until one read succeeds (`modq scan` goes on without)."""
    store = _Flaky()
    store.add("known", ["f" * 64], source="test")
    store.down = True
    worker = BankGate(store, refresh_s=0, until_read=True)
    worker.probe()  # the default Redis, unreachable: a warning, not a refusal
    with pytest.raises(BankUnavailable):
        worker.active()
    scan = BankGate(store, refresh_s=0)
    scan.probe()
    assert not scan.active()
    store.down = False
    assert worker.active(), "once readable, the banks apply"
