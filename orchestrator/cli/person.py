"""What a person reaches an instance with: open (the page), ssh, logs, cost."""

from __future__ import annotations

import subprocess
import sys
import webbrowser
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import inputs
from ..errors import ConfigError
from .app import JsonFlag, NameArg, app, emit, end_progress, err, number, orchestrator, run


@app.command("open")
def open_page(
    name: NameArg = None,
    port: Optional[str] = typer.Option(None, "--port", help="Local port for a tunnel opened now (default 7860; another if taken)."),
    print_only: bool = typer.Option(False, "--print", help="Print the one-time sign-in link instead of opening a browser."),
    as_json: JsonFlag = False,
) -> None:
    """Open the instance's page in your browser, signed in (opens a tunnel if none is open)."""
    from ..lifecycle import access

    def go():
        orch = orchestrator()
        record = orch.resolve(name, want_running=True)
        return access.open_page(orch.ctx, record, number(port, "--port", inputs.port))

    link = run(as_json, go)
    opened = False
    if not print_only and not as_json:
        try:
            opened = webbrowser.open(link.login_url)
        except Exception:  # no browser here (a server, CI): the link is printed instead
            opened = False
    if as_json:
        emit(True, {**link.as_json(), "opened": False})
        return
    if link.tunnel_opened:
        err.print(f"tunnel open in the background; `orch down {link.name}` stops the instance and the tunnel")
    if opened:
        err.print(f"opened {link.name}'s page in your browser")
    else:
        err.print(f"sign in with this link (once, within {link.expires_in // 60} min): {link.login_url}", soft_wrap=True)
        err.print(f"or open {link.url} and sign in as user [bold]orch[/bold] with the token (`orch status {link.name} --json`)",
                  soft_wrap=True)
    emit(False, {}, link.url)


@app.command("ssh")
def ssh(
    words: Optional[list[str]] = typer.Argument(None, metavar="[NAME] [-- CMD...]",
                                                help="Instance name (may be left out when one runs), then `--` and a command."),
    config_only: bool = typer.Option(False, "--config", help="Only write orch's ssh config and say how to use it."),
    as_json: JsonFlag = False,
) -> None:
    """A shell on the instance, or a command there (`orch ssh NAME -- CMD`), with its pinned host key.

    orch keeps an ssh config with a `Host orch-NAME` entry per running instance: `ssh -F
    ORCH_HOME/openssh/config orch-NAME`, or `Include` it from ~/.ssh/config for ssh, scp, rsync and VS Code Remote."""
    from ..lifecycle import access

    names, command = _split(words or [])

    def go():
        if len(names) > 1:
            raise ConfigError(f"put the command after `--`: orch ssh {names[0]} -- {' '.join(names[1:])}")
        orch = orchestrator()
        target = None
        if names or not config_only:
            target = access.running(orch.ctx, orch.resolve(names[0] if names else None, want_running=True))
        config = access.write_ssh_config(orch.ctx, pin=target.name if target else None)
        return orch, target, config

    orch, target, config = run(as_json, go)
    if config_only or as_json:
        data: dict[str, Any] = {"config": str(config.path), "known_hosts": str(config.known_hosts), "include": config.include_line,
                                "hosts": config.hosts, "skipped": config.skipped}
        if target is not None:
            data["host"] = config.hosts.get(target.name)
        emit(as_json, data, f"{config.path}\nhosts: {', '.join(config.hosts.values()) or 'none running'}")
        if not as_json:
            _include_hint(config, always=True)
        return
    assert target is not None
    if access.ssh_client():
        _include_hint(config)
        argv = access.ssh_argv(config, target.name, command)
        code = subprocess.call(argv)
        raise typer.Exit(code)
    if not command:
        from .app import fail

        fail(False, "a shell needs OpenSSH's client (`ssh`), which is not installed: install it (apt install openssh-client, "
                    f"or Windows' optional OpenSSH feature), or run a command: orch ssh {target.name} -- CMD", 1)

    def fallback() -> int:
        with orch.connect(target, timeout=60) as session:
            return access.run_streaming(session, access.remote_command(command))

    raise typer.Exit(run(False, fallback))


def _split(words: list[str]) -> tuple[list[str], list[str]]:
    """[NAME] -- CMD...: click drops the `--`, so it is found in argv (after it, everything is the command)."""
    argv = sys.argv[1:]
    if "--" in argv:
        n = len(argv) - argv.index("--") - 1
        return words[:len(words) - n], words[len(words) - n:]
    return words, []


def _include_hint(config, always: bool = False) -> None:
    """Say once (or when asked) how ssh, scp, rsync and VS Code find orch's hosts."""
    user_config = Path.home() / ".ssh" / "config"
    try:
        included = str(config.path) in user_config.read_text() or config.include_line in user_config.read_text()
    except OSError:
        included = False
    marker = config.path.parent / ".include-hint-shown"
    if included or (marker.exists() and not always):
        return
    err.print(f"[dim]tip: add `{config.include_line}` at the top of ~/.ssh/config; then `ssh orch-NAME`, scp, rsync and "
              f"VS Code Remote-SSH reach orch's instances with their pinned host keys[/dim]")
    try:
        marker.touch()
    except OSError:
        pass


@app.command()
def logs(
    name: NameArg = None,
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing what is added (Ctrl-C stops)."),
    server: bool = typer.Option(False, "--server", help="The image server's log only."),
    agent: bool = typer.Option(False, "--agent", help="The auto-shutdown agent's log only."),
    lines: int = typer.Option(100, "-n", "--lines", help="Lines from the end of each log."),
) -> None:
    """The image server's and the auto-shutdown agent's logs on the instance (read over SSH)."""
    from ..lifecycle import access

    which = "server" if server and not agent else "agent" if agent and not server else "both"

    def go():
        orch = orchestrator()
        record = access.running(orch.ctx, orch.resolve(name, want_running=True))
        command = access.log_command(orch.ctx, record, which, follow, lines)
        end_progress()
        try:
            with orch.connect(record, timeout=60) as session:
                return access.run_streaming(session, command, interrupted=0)  # Ctrl-C ends a follow quietly
        except KeyboardInterrupt:  # before the stream began
            return 0

    code = run(False, go)
    raise typer.Exit(code)


@app.command()
def cost(
    since: Optional[str] = typer.Option(None, "--since", help="From a date (2026-11-01), `today`, or a time ago (12h, 7d, 4w)."),
    as_json: JsonFlag = False,
) -> None:
    """What each instance cost, per day and in total, from its recorded price and running time (stopped time is free)."""
    from ..lifecycle import access

    def go():
        start = access.parse_since(since) if since else None
        orch = orchestrator()
        warnings = access.reconcile_billing(orch.ctx)
        return access.cost_report(orch.state, start), warnings

    report, warnings = run(as_json, go)
    for w in warnings:
        err.print(f"[yellow]warning:[/yellow] {w}")
    if as_json:
        emit(True, {**report.as_json(), "warnings": warnings})
        return
    render_cost(report)


def render_cost(report) -> None:
    out = Console()
    if not report.instances:
        out.print("nothing billed" + (" in that period" if report.since else " yet") + " (cost counts from `orch up` to `orch down`)")
        return
    table = Table(title="by instance")
    for col, justify in (("instance", "left"), ("provider", "left"), ("hours", "right"), ("price/h", "right"), ("cost", "right"),
                         ("now", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for i in report.instances:
        table.add_row(i.name, i.provider, f"{i.seconds / 3600:.2f}", f"{i.price_per_hour:.3f} {i.currency}",
                      f"{i.cost:.4f} {i.currency}", i.state.lower())
    out.print(table)
    for currency in sorted(report.totals):
        days = [d for d in report.days if d["currency"] == currency]
        top = max((d["cost"] for d in days), default=0.0)
        out.print(f"\n[bold]per day, {currency}[/bold]")
        for d in days:
            out.print(f"  {d['date']}  [cyan]{bar(d['cost'], top, 40):<40}[/cyan] {d['cost']:>10.4f} {currency}  "
                      f"[dim]{d['hours']:.2f} h[/dim]", highlight=False)
        out.print(f"  {'total':<10}  {'':<40} [bold]{report.totals[currency]:>10.4f} {currency}[/bold]", highlight=False)
    if len(report.totals) > 1:
        out.print("[dim]currencies are kept apart: orch converts none[/dim]")


def bar(value: float, top: float, width: int) -> str:
    """A horizontal bar in eighths of a character."""
    if top <= 0 or value <= 0:
        return ""
    eighths = max(1, round(value / top * width * 8))
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]

