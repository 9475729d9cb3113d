"""Contact sheets: a grid of thumbnails a reviewer can look at instead of reading a list.

Images are read through modq's own stores and decoder (byte, pixel and frame limits, draft
decoding), since what an index points at is as untrusted as any upload. An image that can no
longer be read (deleted, moved without a record) is drawn as a grey tile naming why.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from worker.config import StorageSettings
from worker.decode import DecodeLimits, decode
from worker.errors import ModqError
from worker.similarity.index import IndexedImage
from worker.storage import LocalStore, ObjectStore, RoutingStore, S3Store, parse_s3_ref, ref_to_path

__all__ = ["CELL", "reader_for", "thumbnail", "write_sheet"]

CELL = 160
CAPTION = 16
HEADER = 28
COLUMNS = 6
_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)


def reader_for(refs: Iterable[str], storage: StorageSettings) -> ObjectStore:
    """A store that reads the given references: their own folders and buckets (the operator's
    index names them), plus whatever the settings allow."""
    refs = list(refs)
    roots = {Path(root) for root in storage.allowed_roots}
    buckets = set(storage.allowed_buckets)
    for ref in refs:
        try:
            if ref.startswith("file://"):
                roots.add(ref_to_path(ref).parent)
            elif ref.startswith("s3://"):
                buckets.add(parse_s3_ref(ref).bucket)
        except ModqError:
            continue  # an unreadable reference becomes a grey tile, not a failed sheet
    return RoutingStore(
        {"file": LocalStore(roots), "s3": S3Store(sorted(buckets), storage.s3_endpoint_url)}
    )


def thumbnail(store: ObjectStore, ref: str, limits: DecodeLimits, size: int = CELL) -> Image.Image:
    try:
        data = store.read(ref, limits.max_bytes)
        image = decode(data, limits, draft_size=size).frames[0]
    except ModqError as exc:
        tile = Image.new("RGB", (size, size), (90, 90, 90))
        ImageDraw.Draw(tile).text((6, size // 2 - 6), f"[{exc.code}]", fill=_TEXT)
        return tile
    image = image.convert("RGB")
    image.thumbnail((size, size))
    return image


def write_sheet(
    items: Sequence[IndexedImage],
    title: str,
    out: Path,
    store: ObjectStore,
    limits: DecodeLimits,
    columns: int = COLUMNS,
) -> Path:
    """One PNG: ``title`` on top, then each item's thumbnail with its verdict and score."""
    rows = max(1, -(-len(items) // columns))
    width = columns * CELL
    sheet = Image.new("RGB", (width, HEADER + rows * (CELL + CAPTION)), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), title, fill=_TEXT)
    for i, item in enumerate(items):
        x = (i % columns) * CELL
        y = HEADER + (i // columns) * (CELL + CAPTION)
        thumb = thumbnail(store, item.where, limits)
        sheet.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        draw.text((x + 4, y + CELL + 2), f"{item.verdict} {item.nsfw_score:.2f}", fill=_TEXT)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out
