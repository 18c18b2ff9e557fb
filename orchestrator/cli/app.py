"""What every command shares: the typer app, settings, rendering, one error handler.

With --json a command prints exactly one JSON object on stdout; progress and logs go to
stderr, always. An orch error is one line saying what to do next (and {"error": ...} under
--json), exit code 1; anything else is a bug: one line naming the log with the traceback,
exit code 2. Nobody a user can cause ends in a traceback on the terminal.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ..durations import parse_duration
from ..errors import ConfigError, OrchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Rent a GPU, run Stable Diffusion on it, never pay for a minute you did not use.")
# Piped to a file or a script, a message stays on one line (grep finds it); on a terminal rich wraps it.
err = Console(stderr=True, soft_wrap=not sys.stderr.isatty())

JsonFlag = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
NameArg = Annotated[Optional[str], typer.Argument(help="Instance name (may be left out when only one exists).")]

T = TypeVar("T")


def settings():
    from ..config import load_settings

    return load_settings()


def orchestrator(loaded=None):
    from ..lifecycle import Orchestrator

    return Orchestrator(loaded or settings(), progress=progress)


def emit(as_json: bool, data: dict[str, Any], human: str | None = None) -> None:
    end_progress()
    if as_json:
        sys.stdout.write(json.dumps(data, allow_nan=False) + "\n")
        sys.stdout.flush()
    elif human is not None:
        Console().print(human, highlight=False)


_STARTED = time.monotonic()


class _Current:
    """The step a long operation is in, with the seconds it has taken so far (re-rendered by the spinner)."""

    def __init__(self, msg: str) -> None:
        self.msg, self.t0 = msg, time.monotonic()

    def __rich__(self) -> str:
        return f"{escape(self.msg)} [dim]{_seconds(time.monotonic() - self.t0)}[/dim]"


_status: Any = None


def progress(msg: str) -> None:
    """A step of a long operation (provisioning, bootstrap, sync, model load, saving an image): a line
    with the time since the command started; on a terminal, a spinner shows the step's time as it runs."""
    global _status
    err.print(f"[dim]{_seconds(time.monotonic() - _STARTED):>6} •[/dim] {escape(msg)}", highlight=False)
    if not err.is_terminal:
        return
    if _status is None:
        from rich.status import Status

        _status = Status(_Current(msg), console=err, spinner="dots")
        _status.start()
    else:
        _status.update(_Current(msg))


def end_progress() -> None:
    """Stop the spinner (before a result or an error is printed)."""
    global _status
    if _status is not None:
        _status.stop()
        _status = None


def _seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def run(as_json: bool, fn: Callable[[], T]) -> T:
    """Call fn; an error becomes one clear line (and a JSON error object), never a traceback."""
    try:
        result = fn()
        end_progress()
        return result
    except OrchError as e:
        fail(as_json, str(e), 1)
    except KeyboardInterrupt:
        fail(as_json, "interrupted", 130)
    except Exception as e:  # a bug: the traceback goes to a log file, the user gets one line
        log = _log_traceback()
        fail(as_json, f"internal error ({type(e).__name__}: {e}); the traceback is in {log}; please report it", 2)
    raise AssertionError("unreachable")


def fail(as_json: bool, message: str, code: int) -> None:
    end_progress()
    err.print(f"[red]error:[/red] {message}", highlight=False)
    if as_json:
        emit(True, {"error": message})
    raise typer.Exit(code)


def _log_traceback() -> str:
    try:
        from ..config import orch_home

        path = orch_home() / "logs" / "cli-errors.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(sys.argv)}\n{traceback.format_exc()}\n")
        return str(path)
    except Exception:
        traceback.print_exc()
        return "the output above"


def duration(value: Optional[str], what: str) -> Optional[float]:
    return None if value is None else parse_duration(value, what=what)


def number(value: Optional[str], what: str, check: Callable[..., Any]) -> Any:
    """A numeric flag taken as text, so that `nan`, `inf` or `abc` get orch's message, not typer's."""
    return None if value is None else check(value, what=what)


__all__ = ["ConfigError", "JsonFlag", "NameArg", "app", "duration", "emit", "err", "fail", "number", "orchestrator",
           "progress", "run", "settings"]


# The names the storage commands use (cli/storage.py).
class Failure(ConfigError):
    """An error to show the user as it is."""


_emit, _run, _settings = emit, run, settings
