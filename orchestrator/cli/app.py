"""What every command shares: the typer app, settings, rendering, error handling.

With --json a command prints exactly one JSON object on stdout; progress and logs go
to stderr, always.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer
from rich.console import Console

from ..config import ConfigError, Settings, load_settings
from ..durations import DurationError, parse_duration

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Rent a GPU, run Stable Diffusion on it, never pay for a minute you did not use.")
err = Console(stderr=True)


class Failure(Exception):
    """An error to show the user: a message, exit code 1 (and {"error": ...} under --json)."""


def _settings() -> Settings:
    try:
        return load_settings()
    except (ConfigError, DurationError) as e:
        raise Failure(str(e)) from None


def _orch(settings: Settings | None = None):
    from ..lifecycle import Orchestrator

    return Orchestrator(settings or _settings())


def _emit(as_json: bool, data: dict[str, Any], human: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()
    elif human is not None:
        Console().print(human, highlight=False)


def _progress(msg: str) -> None:
    err.print(f"[dim]•[/dim] {msg}", highlight=False)


def _run(as_json: bool, fn) -> Any:
    """Call fn, turning known errors into one clear message (and a JSON error object)."""
    from ..errors import LifecycleError, SshError
    from ..providers.base import ProviderError
    from ..storage.stores import StorageError

    try:
        return fn()
    except (Failure, LifecycleError, ProviderError, SshError, StorageError, ConfigError, DurationError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        if as_json:
            _emit(True, {"error": str(e)})
        raise typer.Exit(1) from None


def _duration(value: Optional[str], what: str, default: float) -> float:
    if value is None:
        return default
    try:
        return parse_duration(value, what=what)
    except DurationError as e:
        raise Failure(str(e)) from None
