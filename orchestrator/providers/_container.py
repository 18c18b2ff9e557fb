"""What the container marketplaces (RunPod, Vast.ai) share on the instance side."""

from __future__ import annotations

from ..ssh import sh_path


def stop_program_command(home: str, provider: str, program: str, thing: str) -> str:
    """The agent's stop command where the start command writes a stop program and its scoped key
    (HOME/agent/PROGRAM, HOME/agent/stop.env): run it; where it is missing, say so and exit 1."""
    env, path = sh_path(f"{home}/agent/stop.env"), sh_path(f"{home}/agent/{program}")
    return (f"if [ -f {env} ]; then . {env}; fi; if [ -f {path} ]; then exec python3 {path}; fi; "
            f"echo '{provider}: no stop program on this {thing} (its start command writes it), so it cannot stop itself; "
            f"the laptop stops it: orch status, orch gc or orch down' >&2; exit 1")
