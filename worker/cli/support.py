"""What every `modq` command shares: exit codes, the options that settings also read from the
environment, and one way to report an error.

Exit codes (README, "Exit codes")::

    0    done
    1    a policy outcome: ``--fail-on`` was reached, or ``calibrate`` missed its target
    2    the command cannot run as asked: a bad option, a path or file that does not exist,
         a model, policy or setting modq cannot use, a missing extra
    3    ``modq worker`` cannot moderate (model, stores, banks…) and took no message
         (``worker.queue.tasks.EXIT_UNREADY``)
    70   modq crashed (a bug): the traceback is printed
    130  interrupted (Ctrl-C)
    141  stdout was closed early (``modq scan --report - | head``), as for a tool that
         SIGPIPE ends
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from worker.errors import ModqError

__all__ = [
    "EXIT_CRASH",
    "EXIT_INTERRUPTED",
    "EXIT_PIPE_CLOSED",
    "EXIT_POLICY",
    "EXIT_USAGE",
    "DeviceOpt",
    "JsonOpt",
    "ModelOpt",
    "PrecisionOpt",
    "fail",
    "print_json",
    "reader_may_leave",
    "setting_option",
    "sub_app",
]

EXIT_POLICY = 1
EXIT_USAGE = 2
EXIT_CRASH = 70  # sysexits' EX_SOFTWARE
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE

errors = Console(stderr=True, soft_wrap=True)


def setting_option(*names: str, env: str, help: str, **kwargs: Any) -> Any:
    """An option that overrides the setting ``env``; ``--help`` shows the variable."""
    return typer.Option(*names, envvar=env, show_envvar=True, help=help, **kwargs)


ModelOpt = Annotated[
    str | None,
    setting_option("--model", "-m", env="MODQ_MODEL", help="preset, dir, .onnx or Org/name[@rev]"),
]
PrecisionOpt = Annotated[
    str | None, setting_option(env="MODQ_PRECISION", help="auto, fp32, bf16 or fp16")
]
DeviceOpt = Annotated[str | None, setting_option(env="MODQ_DEVICE", help="auto, cpu, cuda, cuda:N")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON on stdout instead of a table")]


def sub_app(help: str) -> typer.Typer:
    """A command group. Help text is plain text, never Rich markup: ``Org/name[@rev]`` and
    ``[env var: …]`` print as written."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None)


def fail(exc: ModqError) -> typer.Exit:
    """Report a typed error on stderr; the caller raises the exit this returns."""
    errors.print(f"[red]error[/red] {escape(f'[{exc.code}] {exc}')}")
    return typer.Exit(EXIT_USAGE)


def print_json(document: object) -> None:
    """One JSON document on stdout, nothing else there (tables and progress use stderr or
    are not printed)."""
    with reader_may_leave():
        sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
        sys.stdout.flush()


@contextmanager
def reader_may_leave() -> Iterator[None]:
    """Writing to stdout when its reader has gone (``| head``): exit 141, quietly, as a tool
    that SIGPIPE ends, instead of Click's exit 1 (a policy outcome here)."""
    try:
        yield
    except BrokenPipeError as exc:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail too
        raise typer.Exit(EXIT_PIPE_CLOSED) from exc
