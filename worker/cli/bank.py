"""`modq bank …`: fill, list and switch the banks of known-bad image hashes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from worker.banks import (
    PDQ_QUALITY_MIN,
    BankStore,
    RedisBankStore,
    check_bank_name,
    hash_images,
    load_hash_list,
)
from worker.cli.support import JsonOpt, fail, print_json, sub_app
from worker.config import Settings
from worker.errors import CorruptImage, InvalidDataset, ModqError, ObjectNotFound

__all__ = ["register"]

StoreFactory = Callable[[], BankStore]

console = Console(stderr=True, soft_wrap=True)
_SHOWN = 20  # skipped items listed one by one; the rest are counted
_CLI_TIMEOUT_S = 10.0  # a bulk add writes in large pipelines: allow the server time


def _redis_store() -> BankStore:
    return RedisBankStore.from_settings(Settings().banks, timeout_s=_CLI_TIMEOUT_S)


@contextmanager
def _reported() -> Iterator[None]:
    """A ``ModqError`` becomes ``[code] message`` on stderr and exit status 2."""
    try:
        yield
    except ModqError as exc:
        raise fail(exc) from exc


def _image_loader(settings: Settings) -> Callable[[Path], Image.Image]:
    """Decodes as the pipeline does (same limits, EXIF orientation, RGB), first frame only."""
    from worker.decode import decode

    limits = settings.decode.limits.first_frame()

    def load(path: Path) -> Image.Image:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CorruptImage(f"cannot read it: {exc.strerror or exc}") from exc
        return decode(data, limits).frames[0]

    return load


def _listed(items: Sequence[str]) -> list[str]:
    shown = [f"  {item}" for item in items[:_SHOWN]]
    if len(items) > _SHOWN:
        shown.append(f"  ... and {len(items) - _SHOWN} more")
    return shown


class _BankCommands:
    """The `bank` commands, bound to the store they act on (Redis, or a fake in tests)."""

    def __init__(self, store_factory: StoreFactory) -> None:
        self.store_factory = store_factory

    def add(
        self,
        name: Annotated[str, typer.Argument(help="the bank: letters, digits, '.', '_', '-'")],
        path: Annotated[
            Path, typer.Argument(help="a folder or image to hash, or a hash list (.txt, .csv)")
        ],
        source: Annotated[
            str | None, typer.Option(help="where the hashes come from; default: PATH's name")
        ] = None,
    ) -> None:
        """Add hashes to a bank, creating it (enabled) if new. A folder or image file is
        hashed with PDQ; any other file is read as a hash list. Prints how many were new."""
        out = Console()
        with _reported():
            check_bank_name(name)  # before hashing a large folder
            if not path.exists():
                raise ObjectNotFound(f"{path}: no such file or folder")
            hashes, skipped = self._read(path, out)
            with closing(self.store_factory()) as store:
                added = store.add(name, hashes, source or path.name)
        known = len(set(hashes)) - added
        out.print(f"bank {name}: {added} hashes added, {known} already there")
        for line in skipped:
            out.print(line, markup=False, highlight=False)

    def _read(self, path: Path, out: Console) -> tuple[list[str], list[str]]:
        """The hashes at ``path`` and the lines that report what was skipped."""
        from worker.scan import IMAGE_SUFFIXES, iter_files

        if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
            images = list(iter_files([path]))
            if not images:
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                raise InvalidDataset(f"{path}: no image files in it (by suffix: {suffixes})")
            hashes, skipped = hash_images(images, _image_loader(Settings()))
            out.print(f"hashed {len(hashes)} of {len(images)} images")
            report = [f"{s.path}: {s.reason}" for s in skipped]
            head = [f"skipped {len(skipped)} images:"] if skipped else []
            return hashes, head + _listed(report)
        hash_list = load_hash_list(path)
        lines = [str(n) for n in hash_list.low_quality]
        out.print(f"read {len(hash_list.hashes) + len(lines)} hashes from {path}")
        if not lines:
            return hash_list.hashes, []
        title = f"skipped {len(lines)} hashes below PDQ quality {PDQ_QUALITY_MIN}, on lines:"
        return hash_list.hashes, [title, *_listed(lines)]

    def list_banks(self, as_json: JsonOpt = False) -> None:
        """Every bank: whether it is matched, its hash count, when it was made and from what."""
        with _reported(), closing(self.store_factory()) as store:
            banks = store.banks()
        if as_json:
            print_json([
                {
                    "name": bank.name,
                    "enabled": bank.enabled,
                    "hashes": bank.count,
                    "created": datetime.fromtimestamp(bank.created, UTC).isoformat(),
                    "source": bank.source,
                }
                for bank in banks
            ])  # fmt: skip
            return
        out = Console()
        if not banks:
            out.print("no banks yet: add one with `modq bank add NAME FILE|DIR`")
            return
        table = Table(title="modq banks")
        for column in ("name", "enabled", "hashes", "created", "source"):
            table.add_column(column, justify="right" if column == "hashes" else "left")
        for bank in banks:
            created = datetime.fromtimestamp(bank.created, UTC).strftime("%Y-%m-%d %H:%M UTC")
            enabled = "yes" if bank.enabled else "no"
            table.add_row(escape(bank.name), enabled, str(bank.count), created, escape(bank.source))
        out.print(table)

    def enable(self, name: Annotated[str, typer.Argument(help="the bank")]) -> None:
        """Match images against this bank again."""
        self._switch(name, True)

    def disable(self, name: Annotated[str, typer.Argument(help="the bank")]) -> None:
        """Stop matching images against this bank; its hashes are kept."""
        self._switch(name, False)

    def _switch(self, name: str, enabled: bool) -> None:
        with _reported(), closing(self.store_factory()) as store:
            store.set_enabled(name, enabled)
        Console().print(f"bank {name} {'enabled' if enabled else 'disabled'}")


def register(app: typer.Typer, store_factory: StoreFactory | None = None) -> None:
    """Add the `bank` commands to ``app``. They use the Redis at MODQ_BANK_URL (default:
    MODQ_CACHE_URL), under MODQ_CACHE_PREFIX, unless ``store_factory`` gives another store."""
    commands = _BankCommands(store_factory or _redis_store)
    bank_app = sub_app("Banks of known-bad image hashes (PDQ), matched before the model runs.")
    bank_app.command("add")(commands.add)
    bank_app.command("list")(commands.list_banks)
    bank_app.command("enable")(commands.enable)
    bank_app.command("disable")(commands.disable)
    app.add_typer(bank_app, name="bank")
