"""The `orch` command. Thin: parse, call one function, render.

One module per area registers its commands on the shared typer app (app.py).
"""

from __future__ import annotations

from . import batch, images, instances, person, storage  # noqa: F401  (registers the commands)
from .app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
