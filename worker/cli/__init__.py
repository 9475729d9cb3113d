"""The `modq` command line: one module per command group, gathered by ``worker.cli.root``."""

from worker.cli.root import app, main

__all__ = ["app", "main"]
