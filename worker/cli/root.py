"""The `modq` command line's root: the app, its command groups, and the exit codes of what
escapes a command."""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from worker.cli.bank import register as register_bank_commands
from worker.cli.calibrate import register as register_calibrate_commands
from worker.cli.explain import register as register_explain_commands
from worker.cli.finetune import register as register_finetune_commands
from worker.cli.index import register as register_index_commands
from worker.cli.models import register as register_model_commands
from worker.cli.queue import register as register_queue_commands
from worker.cli.scan import register as register_scan_command
from worker.cli.support import EXIT_CRASH, EXIT_INTERRUPTED, fail, sub_app
from worker.config import settings_error
from worker.errors import ModqError
from worker.optional import missing_extra

__all__ = ["app", "main"]

app = sub_app("modq: moderate images with NSFW classifiers.")
register_scan_command(app)
register_model_commands(app)
register_queue_commands(app)
register_index_commands(app)
register_bank_commands(app)
register_calibrate_commands(app)
register_explain_commands(app)
register_finetune_commands(app)
console = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"modq {version('modq')}")
        raise typer.Exit()


@app.callback()
def _root(
    _: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print modq's version and exit"
        ),
    ] = False,
) -> None:
    """modq: moderate images with NSFW classifiers."""


def main() -> None:
    """The `modq` executable: the app, with the exit codes of ``cli_support`` for what
    escapes a command (a missing extra, a typed error, a crash, Ctrl-C)."""
    try:
        app()
    except ModuleNotFoundError as exc:
        if (missing := missing_extra(exc)) is None:
            raise _crashed() from exc
        raise SystemExit(fail(missing).exit_code) from exc
    except ModqError as exc:
        raise SystemExit(fail(exc).exit_code) from exc
    except ValidationError as exc:  # settings read outside Settings.with_options
        raise SystemExit(fail(settings_error(exc)).exit_code) from exc
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        raise _crashed() from exc


def _crashed() -> SystemExit:
    import traceback

    traceback.print_exc()
    console.print("[red]modq crashed[/red]: this is a bug; please report it with the traceback")
    return SystemExit(EXIT_CRASH)
