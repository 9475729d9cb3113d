"""Known-bad hash banks without Redis: PDQ hashing, hash-list parsing, the multi-index, the
in-memory store on real (generated) images, and the `modq bank` commands on that store.

The store contract both stores keep is in tests/integration/test_banks_redis.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pdqhash
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.support.images import flat, recompressed, textured
from worker.banks import (
    PDQ_MAX_DISTANCE,
    PDQ_QUALITY_MIN,
    BankMatch,
    MemoryBankStore,
    RedisBankStore,
    hash_images,
    load_hash_list,
    parse_pdq,
    pdq_hash,
    read_hash_list,
)
from worker.cli.bank import register
from worker.config import Settings
from worker.errors import ConfigError, InvalidHashList, UnknownBank
from worker.hashing.mih import hamming
from worker.hashing.pdq import HASH_BITS
from worker.hashing.pdq_index import CHUNK_BITS, MAX_PROBES, MultiIndex, probe_count

H1 = "f" * 64
H2 = "0123456789abcdef" * 4
H3 = "a5" * 32

# --- PDQ --------------------------------------------------------------------------------------


def test_pdq_hex_is_the_bit_vector_most_significant_bit_first() -> None:
    image = textured(1)
    bits, quality = pdqhash.compute(np.asarray(image))
    expected = format(int("".join(str(int(b)) for b in bits), 2), "064x")
    assert pdq_hash(image).hex == expected
    assert pdq_hash(image).quality == quality >= PDQ_QUALITY_MIN


def test_pdq_hash_converts_other_modes_to_rgb() -> None:
    image = textured(2)
    assert pdq_hash(image.convert("RGBA")) == pdq_hash(image)


def test_parse_pdq_takes_64_hex_digits_in_either_case() -> None:
    assert parse_pdq(H2.upper()) == parse_pdq(H2) == int(H2, 16)
    for bad in ("f" * 63, "f" * 65, "g" + "f" * 63, "", " " + "f" * 63, "0x" + "f" * 62):
        with pytest.raises(ValueError, match="64 hex digits"):
            parse_pdq(bad)


# --- matching real images in the memory store -------------------------------------------------


@pytest.fixture
def store() -> MemoryBankStore:
    return MemoryBankStore(clock=lambda: 1_700_000_000.0)


def test_the_same_image_matches_exactly(store: MemoryBankStore) -> None:
    known = pdq_hash(textured(3))
    assert store.add("known", [known.hex], "test") == 1
    assert store.match(known.hex) == BankMatch("known", 0, known.hex)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_a_half_size_jpeg_60_copy_matches_within_31(store: MemoryBankStore, seed: int) -> None:
    original = textured(seed)
    known = pdq_hash(original)
    store.add("known", [known.hex, pdq_hash(textured(seed + 100)).hex], "test")
    copy = pdq_hash(recompressed(original))
    assert copy.quality >= PDQ_QUALITY_MIN
    assert copy.hex != known.hex  # a near match, not an exact one
    distance = hamming(parse_pdq(copy.hex), parse_pdq(known.hex))
    assert store.match(copy.hex) == BankMatch("known", distance, known.hex)
    assert 0 < distance <= PDQ_MAX_DISTANCE


def test_an_unrelated_image_does_not_match(store: MemoryBankStore) -> None:
    banked = [pdq_hash(textured(seed)).hex for seed in range(20, 25)]
    store.add("known", banked, "test")
    other = pdq_hash(textured(99))
    nearest = min(hamming(parse_pdq(other.hex), parse_pdq(h)) for h in banked)
    assert nearest > PDQ_MAX_DISTANCE  # the test means something: it is truly far
    assert store.match(other.hex) is None


def test_a_disabled_bank_does_not_match_until_enabled_again(store: MemoryBankStore) -> None:
    known = pdq_hash(textured(4))
    copy = pdq_hash(recompressed(textured(4)))
    store.add("partner", [known.hex], "test")
    store.set_enabled("partner", False)
    assert store.match(copy.hex) is None
    assert [b.enabled for b in store.banks()] == [False]
    store.set_enabled("partner", True)
    found = store.match(copy.hex)
    assert found is not None and found.bank == "partner" and found.hash == known.hex


def test_an_unknown_bank_cannot_be_switched(store: MemoryBankStore) -> None:
    with pytest.raises(UnknownBank, match="no bank named 'nope'"):
        store.set_enabled("nope", True)


def test_radii_needing_too_many_probes_are_refused(store: MemoryBankStore) -> None:
    store.add("known", [H1], "test")
    assert store.match(H1, max_distance=47) is not None  # 2 flips per chunk: 2,192 probes
    assert probe_count(48) > MAX_PROBES
    with pytest.raises(ConfigError, match=r"distance 48 needs 11152 index lookups"):
        store.match(H1, max_distance=48)
    with pytest.raises(ConfigError, match=r"must be in 0\.\.256"):
        store.match(H1, max_distance=-1)


# --- images into banks ------------------------------------------------------------------------


def test_flat_images_are_skipped_by_the_quality_gate_and_reported(tmp_path: Path) -> None:
    flat(64).save(tmp_path / "flat.png")
    textured(5).save(tmp_path / "photo.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths = [tmp_path / "flat.png", tmp_path / "photo.png", tmp_path / "broken.png"]
    hashes, skipped = hash_images(paths)
    assert hashes == [pdq_hash(textured(5)).hex]
    by_name = {s.path.name: s for s in skipped}
    assert set(by_name) == {"flat.png", "broken.png"}
    low = by_name["flat.png"]
    assert low.quality is not None and low.quality < PDQ_QUALITY_MIN
    assert f"below {PDQ_QUALITY_MIN}" in low.reason
    assert by_name["broken.png"].reason.startswith("[corrupt_image]")


# --- hash lists -------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "list.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_plain_hash_list_with_comments_quality_and_tabs(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"# partner list, 2024\n\n{H1}\n{H2.upper()},87,photo.jpg\n{H3}\t12\n"
        f"   \n{H1},49\n{H2},50\n",
    )
    hash_list = load_hash_list(path)
    assert hash_list.hashes == [H1, H2, H2]
    assert hash_list.low_quality == [5, 7]  # quality 12 and 49: below the gate of 50
    assert read_hash_list(path) == hash_list.hashes


def test_a_threatexchange_style_csv_export(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "id,signal_type,signal,quality,tags\n"
        f'101,pdq,{H1},100,"cat,dog"\n'
        f"102,pdq,{H2},20,\n"
        f'103,pdq,{H3},,"a"\n',
        "export.csv",
    )
    hash_list = load_hash_list(path)
    assert hash_list.hashes == [H1, H3]
    assert hash_list.low_quality == [3]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (f"{H1}\n{H2}\n{H1[:-1]}\n{H3}\n", 3, "64 hex digits"),
        (f"{H1}\n# ok\n\n{H2[:-1]}z\n", 4, "64 hex digits"),
        (f"{H1},high\n", 1, "quality must be a whole number"),
        (f"{H1}\n{H2},101\n", 2, "quality must be a whole number"),
        ("name,value\nx,y\n", 1, "header naming a hash"),
        (f"hash,quality\n{H1},90\nnot-a-hash,90\n", 3, "64 hex digits"),
        ("signal_type,signal\npdq\n", 2, "no field 2"),
    ],
)
def test_a_malformed_line_rejects_the_whole_file(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InvalidHashList, match=message) as caught:
        read_hash_list(path)
    assert f"{path}: line {line}: " in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"# only a comment\n\n", b"hash,quality\n"])
def test_a_list_with_no_hashes_is_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(InvalidHashList, match="no PDQ hashes"):
        read_hash_list(path)


def test_a_binary_file_is_not_a_hash_list(tmp_path: Path) -> None:
    path = tmp_path / "list.bin"
    path.write_bytes(b"\xff\xd8\xff\xe0 binary")
    with pytest.raises(InvalidHashList, match="not a UTF-8 text file"):
        read_hash_list(path)


# --- the multi-index against brute force ------------------------------------------------------

HASHES = st.integers(0, (1 << HASH_BITS) - 1)


@st.composite
def spread_mask(draw: st.DrawFn, distance: int) -> int:
    """``distance`` flipped bits dealt round-robin over the 16 chunks: the pigeonhole's tight
    case, where only the chunks holding the fewest flips are within reach of a probe."""
    start = draw(st.integers(0, 15))
    mask = 0
    for k in range(distance):
        chunk = (start + k) % 16
        taken = {b for b in range(CHUNK_BITS) if mask >> (chunk * CHUNK_BITS + b) & 1}
        bit = draw(st.sampled_from(sorted(set(range(CHUNK_BITS)) - taken)))
        mask |= 1 << (chunk * CHUNK_BITS + bit)
    return mask


@st.composite
def neighbourhoods(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    """A query, a radius and stored hashes around it: random flips, spread flips at and just
    past the radius, and unrelated hashes."""
    query = draw(HASHES)
    radius = draw(st.integers(0, 47))
    scattered = draw(st.lists(st.sets(st.integers(0, HASH_BITS - 1), max_size=52), max_size=12))
    masks = [sum(1 << p for p in positions) for positions in scattered]
    for distance in (radius, radius + 1, draw(st.integers(0, radius))):
        masks.append(draw(spread_mask(distance)))
    stored = [query ^ mask for mask in masks] + draw(st.lists(HASHES, max_size=4))
    return query, radius, stored


@settings(max_examples=300, deadline=None)
@given(neighbourhoods())
def test_multi_index_finds_exactly_what_brute_force_finds(
    case: tuple[int, int, list[int]],
) -> None:
    query, radius, stored = case
    index = MultiIndex()
    for value in stored:
        index.add(value)
    expected = {v: hamming(query, v) for v in stored if hamming(query, v) <= radius}
    assert index.within(query, radius) == expected


@settings(max_examples=100, deadline=None)
@given(neighbourhoods())
def test_the_store_returns_the_closest_as_brute_force_does(
    case: tuple[int, int, list[int]],
) -> None:
    query, radius, stored = case
    store = MemoryBankStore()
    store.add("b", [format(v, "064x") for v in stored], "test")
    within = sorted((hamming(query, v), v) for v in stored if hamming(query, v) <= radius)
    found = store.match(format(query, "064x"), max_distance=radius)
    if not within:
        assert found is None
    else:
        assert found == BankMatch("b", within[0][0], format(within[0][1], "064x"))


def test_the_bank_redis_and_prefix_come_from_settings() -> None:
    with pytest.raises(ConfigError, match="MODQ_BANK_URL and MODQ_CACHE_URL are both empty"):
        RedisBankStore.from_settings(Settings(bank_url=None, cache_url=None).banks)
    for bank_url, port, db in (("redis://127.0.0.1:7001/5", 7001, 5), (None, 7002, 1)):
        settings = Settings(
            bank_url=bank_url, cache_url="redis://127.0.0.1:7002/1", cache_prefix="p"
        )
        store = RedisBankStore.from_settings(settings.banks)  # connects lazily: no server needed
        connection = store.client.connection_pool.connection_kwargs
        assert (connection["port"], connection["db"]) == (port, db)
        assert connection["socket_timeout"] == 1.0
        assert store._registry == "p:v1:bank:registry"
        store.close()


# --- `modq bank` on the memory store ----------------------------------------------------------


def _cli(store: MemoryBankStore) -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """modq, as `worker.cli` builds it."""

    register(app, store_factory=lambda: store)
    return app


def _run(store: MemoryBankStore, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(_cli(store), [*args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    return result.exit_code, result.stdout, result.stderr


def test_cli_adds_a_hash_list_and_reports_new_and_skipped(
    tmp_path: Path, store: MemoryBankStore
) -> None:
    path = _write(tmp_path, f"{H1}\n{H2},10\n{H3}\n")
    code, out, _ = _run(store, "bank", "add", "partner", str(path))
    assert code == 0
    assert "bank partner: 2 hashes added, 0 already there" in out
    assert "skipped 1 hashes below PDQ quality 50, on lines:\n  2" in out
    code, out, _ = _run(store, "bank", "add", "partner", str(path), "--source", "again")
    assert "bank partner: 0 hashes added, 2 already there" in out
    [info] = store.banks()
    assert (info.name, info.count, info.source) == ("partner", 2, "list.txt")


def test_cli_rejects_a_malformed_list_whole_and_adds_nothing(
    tmp_path: Path, store: MemoryBankStore
) -> None:
    path = _write(tmp_path, f"{H1}\n{H2}\nnot a hash\n{H3}\n")
    code, _, err = _run(store, "bank", "add", "partner", str(path))
    assert code == 2
    assert "[invalid_hash_list]" in err and "line 3:" in err and "list.txt" in err
    assert store.banks() == []


def test_cli_hashes_a_folder_and_skips_flat_images(tmp_path: Path, store: MemoryBankStore) -> None:
    folder = tmp_path / "known"
    (folder / "sub").mkdir(parents=True)
    textured(6).save(folder / "a.png")
    textured(7).save(folder / "sub" / "b.jpg", quality=95)
    flat().save(folder / "flat.png")
    (folder / "notes.txt").write_text("not an image, not picked up in a folder")
    code, out, _ = _run(store, "bank", "add", "mine", str(folder))
    assert code == 0, out
    assert "hashed 2 of 3 images" in out
    assert "bank mine: 2 hashes added" in out
    assert "skipped 1 images:" in out and "flat.png: PDQ quality" in out
    found = store.match(pdq_hash(recompressed(textured(6))).hex)
    assert found is not None and found.bank == "mine"


def test_cli_lists_and_switches_banks(tmp_path: Path, store: MemoryBankStore) -> None:
    code, out, _ = _run(store, "bank", "list")
    assert code == 0 and "no banks yet" in out
    store.add("zeta", [H1], "zeta.txt")
    store.add("alpha", [H2, H3], "ncmec-2024.csv")
    code, out, _ = _run(store, "bank", "disable", "zeta")
    assert code == 0 and "bank zeta disabled" in out
    code, out, _ = _run(store, "bank", "list")
    rows = [line for line in out.splitlines() if "alpha" in line or "zeta" in line]
    assert len(rows) == 2 and "alpha" in rows[0]  # by name
    assert "yes" in rows[0] and " 2 " in rows[0] and "ncmec-2024.csv" in rows[0]
    assert "no" in rows[1].split() and "2023-11-14 22:13 UTC" in rows[1]
    code, out, _ = _run(store, "bank", "list", "--json")
    assert code == 0
    assert [(b["name"], b["enabled"], b["hashes"]) for b in json.loads(out)] == [
        ("alpha", True, 2),
        ("zeta", False, 1),
    ]
    code, _, _ = _run(store, "bank", "enable", "zeta")
    assert code == 0 and all(b.enabled for b in store.banks())


def test_cli_errors_are_typed_and_exit_2(tmp_path: Path, store: MemoryBankStore) -> None:
    code, _, err = _run(store, "bank", "enable", "nope")
    assert code == 2 and "[unknown_bank] no bank named 'nope'" in err
    code, _, err = _run(store, "bank", "add", "bad name!", str(tmp_path))
    assert code == 2 and "[config] bad bank name" in err
    code, _, err = _run(store, "bank", "add", "ok", str(tmp_path / "missing.txt"))
    assert code == 2 and "[not_found]" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(store, "bank", "add", "ok", str(tmp_path / "empty"))
    assert code == 2 and "[invalid_dataset]" in err and "no image files" in err
    assert store.banks() == []
